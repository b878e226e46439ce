"""The model side of training: the checkpoint loaded offline as the engine loads it, gradient checkpointing of the
text encoders, and the safetensors writer with kohya's addnet hashes (the LoRA network itself is in
:mod:`gpu_runtime.trainer.lora`)."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError


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


def _checkpoint_text_encoder(encoder: Any) -> None:
    """Gradient checkpointing for a transformers text encoder (the method was renamed in transformers 5)."""
    kwargs = {"use_reentrant": False}  # reentrant checkpoints drop gradients of inputs that need none
    if hasattr(encoder, "activation_checkpointing_enable"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
