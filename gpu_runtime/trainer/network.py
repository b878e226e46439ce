"""The model side of training: the checkpoint loaded offline as the engine loads it, kohya's LoRA targets injected
as peft adapters, and the trained adapters exported under kohya's key names into a safetensors file."""

from __future__ import annotations

import hashlib
import io
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError

# kohya's LoRA targets (networks/lora.py): Linear/1x1-conv layers of the UNet's transformer blocks, CLIP attn/MLP.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class _Model:
    """The frozen pieces of a loaded checkpoint that training needs."""

    family: str
    xl: bool
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    noise_scheduler: Any
    weight_dtype: torch.dtype


def _load_model(model_path: Path, config_root: Path, device: str, weight_dtype: torch.dtype) -> _Model:
    """Load a checkpoint offline exactly as the engine does: detected family, shipped config dir, no hub."""
    import diffusers

    from gpu_runtime.families import UnknownModelFamily, config_dir_for, family_of_file, pipeline_class_of

    if not Path(model_path).is_file():
        raise TrainingError(f"the base model {model_path} does not exist")
    try:
        family = family_of_file(Path(model_path))
    except UnknownModelFamily as exc:
        raise TrainingError(str(exc)) from None
    if "inpainting" in family:
        raise TrainingError(f"the base model is an inpainting checkpoint ({family}): LoRA training needs a base model")
    class_name = pipeline_class_of(family)
    pipeline_class = getattr(diffusers, class_name)
    try:
        pipe = pipeline_class.from_single_file(
            str(model_path),
            config=str(config_dir_for(family, config_root)),
            local_files_only=True,
            torch_dtype=weight_dtype,
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise TrainingError(f"the base model {Path(model_path).name} could not be loaded: {exc}") from exc
    xl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if xl else [pipe.text_encoder]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if xl else [pipe.tokenizer]
    # The VAE only encodes training images once or per step without gradients; float32 avoids SDXL's fp16 NaNs.
    vae = _move(pipe.vae, device, torch.float32)
    unet = _move(pipe.unet, device, weight_dtype)
    encoders = [_move(encoder, device, weight_dtype) for encoder in encoders]
    for module in (vae, unet, *encoders):
        module.requires_grad_(False)
        module.eval()
    noise_scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    return _Model(family, xl, unet, vae, encoders, tokenizers, noise_scheduler, weight_dtype)


def _move(module: Any, device: str, dtype: torch.dtype) -> Any:
    """Move a module, casting only when its dtype differs (diffusers logs a warning on every cast)."""
    if module.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device)


def _target_modules(model: torch.nn.Module, targets: tuple[str, ...], unet: bool) -> list[str]:
    """Full module names of the layers kohya's LoRA wraps (UNet: only inside transformer blocks)."""
    names = []
    for name, module in model.named_modules():
        if unet and ".attentions." not in f".{name}":
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
        ):
            names.append(name)
    return names


def _add_lora(model: torch.nn.Module, targets: list[str], config: TrainingConfig) -> list[torch.nn.Parameter]:
    """Inject peft LoRA layers (kohya's init: down kaiming-uniform, up zero; scale alpha/dim); return their
    parameters, kept in float32 whatever the frozen weights' dtype."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=config.network_dim,
        lora_alpha=config.network_alpha,
        target_modules=targets,
        init_lora_weights=True,
        lora_dropout=0.0,
    )
    inject_adapter_in_model(lora, model, adapter_name="default")
    params = []
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
            params.append(param)
        else:
            param.requires_grad_(False)
    return params


def _checkpoint_text_encoder(encoder: Any) -> None:
    """Gradient checkpointing for a transformers text encoder (the method was renamed in transformers 5)."""
    kwargs = {"use_reentrant": False}  # reentrant checkpoints drop gradients of inputs that need none
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def _ldm_unet_name(name: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> LDM path (kohya's SDXL LoRA names use LDM block numbers)."""
    step = layers_per_block + 1
    match = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if match:
        i, j, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        return f"input_blocks.{step * i + j + 1}.1.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name)
    if match:
        i, j, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        return f"output_blocks.{step * i + j}.1.{rest}"
    if name.startswith("mid_block.attentions.0."):
        return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")
    return name


def _kohya_state_dict(model: _Model, config: TrainingConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained adapters under kohya's names: ``lora_unet_<path with _>`` (SD 1/2: diffusers paths; SDXL: LDM
    paths), ``lora_te_text_model_...`` (SDXL: ``lora_te1_``/``lora_te2_``), each with lora_down/lora_up/alpha."""
    modules: list[tuple[str, Any]] = []
    if config.train_unet:
        layers = model.unet.config["layers_per_block"]
        for name, layer in _lora_layers(model.unet):
            path = _ldm_unet_name(name, layers) if model.xl else name
            modules.append(("lora_unet_" + path.replace(".", "_"), layer))
    if config.train_text_encoder:
        prefixes = ["lora_te1_", "lora_te2_"] if model.xl else ["lora_te_"]
        for prefix, encoder in zip(prefixes, model.text_encoders, strict=True):
            for name, layer in _lora_layers(encoder):
                path = "text_model." + name.removeprefix("text_model.")
                modules.append((prefix + path.replace(".", "_"), layer))
    out: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(config.network_alpha), dtype=dtype)
    for key, layer in modules:
        out[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = alpha.clone()
    return out


def _addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's ``sshs_model_hash``/``sshs_legacy_hash`` (what the additional-networks extension shows)."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    buffer = io.BytesIO(blob)
    buffer.seek(0x100000)
    legacy = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write to a temporary sibling, then rename: a reader (the uploader) never sees half a file."""
    from safetensors.torch import save_file

    model_hash, legacy = _addnet_hashes(tensors, metadata)
    metadata = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _save_dtype(config: TrainingConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.save_precision, torch.float32)
