"""A tiny random SD 1.5-architecture model, built offline, and writers for the single files the worker consumes.

Why: tests (and the README demo) need a real checkpoint to load, generate with, and attach LoRAs, VAEs and
textual-inversion embeddings to - without downloading gigabytes. The tiny UNet mirrors SD 1.5's layout (attention in
all but the deepest block), the VAE has SD's 8x downsampling, and the text encoder is a 2-layer CLIP behind the
*real* CLIP tokenizer, so every code path (key conversion, ``from_single_file``, kohya LoRA names) is the real one.
A 64x64 image with 2-4 steps takes tens of milliseconds on a CPU.

Also here: a diffusers -> LDM ("original SD") single-file writer, generic in the number of blocks and layers and
covering SD 1.x (CLIP-L), SD 2.x (OpenCLIP) and SDXL (both encoders) layouts; diffusers ships only the reverse.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from gpu_runtime.families import (
    CLIP_VOCAB_SIZE,
    EOS,
    FAMILY_METADATA_KEY,
    SD_SCHEDULER,
    TINY_FAMILY,
    TINY_INPAINT_FAMILY,
    TINY_SDXL_FAMILY,
    FamilySpec,
    clip_tokenizer,
    family_of_file,
    materialize_config_dir,
)

__all__ = [
    "TINY_SDXL_SPEC",
    "TINY_SPEC",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_vae",
    "ldm_state_dict",
    "save_single_file",
    "tiny_config_dir",
    "write_tiny_controlnet",
    "write_tiny_embedding",
    "write_tiny_inpainting_model",
    "write_tiny_lora",
    "write_tiny_model",
    "write_tiny_sdxl_embedding",
    "write_tiny_sdxl_model",
    "write_tiny_vae",
]

TINY_UNET: dict[str, Any] = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
# 4 blocks -> 8x spatial downsampling like SD's VAE (a 64 px image gives 8x8 latents; 2 blocks made it 7x slower).
TINY_VAE: dict[str, Any] = {
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 64,
}
# Full CLIP vocabulary (the real tokenizer's ids must all be valid); 49408 x 32 embeddings are only 1.6 M params.
TINY_TEXT_ENCODER: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_SPEC = FamilySpec(
    name=TINY_FAMILY,
    pipeline_class="StableDiffusionPipeline",
    unet=TINY_UNET,
    vae=TINY_VAE,
    text_encoders={"text_encoder": ("CLIPTextModel", TINY_TEXT_ENCODER)},
    tokenizers={"tokenizer": EOS},
    scheduler=SD_SCHEDULER,
    index_extra={
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    },
)

# A tiny inpainting checkpoint: the same with a 9-channel UNet input (latents, mask, masked image latents).
TINY_INPAINT_SPEC = replace(TINY_SPEC, name=TINY_INPAINT_FAMILY, unet={**TINY_UNET, "in_channels": 9})

# A tiny SDXL-architecture model: two text encoders (the second wider, which is how diffusers tells them apart),
# size conditioning through ``addition_embed_type="text_time"``, and SDXL's zeroed empty negative prompt.
TINY_SDXL_TEXT_ENCODER_2: dict[str, Any] = {
    **TINY_TEXT_ENCODER,
    "hidden_size": 40,
    "intermediate_size": 48,
    "projection_dim": 40,
    "hidden_act": "gelu",
}
TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "cross_attention_dim": 72,
    "attention_head_dim": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 8 * 6 + 40,
}
TINY_SDXL_SPEC = FamilySpec(
    name=TINY_SDXL_FAMILY,
    pipeline_class="StableDiffusionXLPipeline",
    unet=TINY_SDXL_UNET,
    vae=TINY_VAE,
    text_encoders={
        "text_encoder": ("CLIPTextModel", TINY_TEXT_ENCODER),
        "text_encoder_2": ("CLIPTextModelWithProjection", TINY_SDXL_TEXT_ENCODER_2),
    },
    tokenizers={"tokenizer": EOS, "tokenizer_2": "!"},
    scheduler=SD_SCHEDULER,
    index_extra={
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    },
)

# kohya's LoRA targets (networks/lora.py): Linear/1x1-conv layers in UNet transformer blocks and CLIP attention/MLP.
LORA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LORA_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# --- tiny model -----------------------------------------------------------------------------------------------


def build_tiny_vae(seed: int = 1) -> AutoencoderKL:
    """A random tiny VAE (the tiny model's architecture), seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**TINY_VAE).eval()


def build_tiny_pipeline(seed: int = 0, inpainting: bool = False) -> StableDiffusionPipeline:
    """A random tiny SD 1.5-architecture pipeline with the real CLIP tokenizer and an Euler scheduler.

    Deterministic for a seed (the global RNG is left as it was). Same configs as :func:`tiny_config_dir`, so a
    file written by :func:`write_tiny_model` loads back into an identical pipeline.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(TINY_INPAINT_SPEC.unet if inpainting else TINY_UNET))
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_config_dir(root: Path, family: str = TINY_FAMILY) -> Path:
    """The offline config dir of a tiny family, ``root/<family>`` (written once, like ``families.config_dir``)."""
    specs = {TINY_SDXL_FAMILY: TINY_SDXL_SPEC, TINY_INPAINT_FAMILY: TINY_INPAINT_SPEC}
    return materialize_config_dir(specs.get(family, TINY_SPEC), root)


def build_tiny_sdxl_pipeline(seed: int = 0) -> Any:
    """A random tiny SDXL-architecture pipeline (deterministic for a seed; the global RNG is left alone)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_SDXL_TEXT_ENCODER_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer("!"),
        unet=unet.eval(),
        scheduler=EulerDiscreteScheduler(**SD_SCHEDULER),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_sdxl_model(path: Path, seed: int = 0) -> Path:
    """The tiny SDXL pipeline as an LDM single file (float32), marked ``esd_family=tiny-sdxl``."""
    path = Path(path)
    metadata = {FAMILY_METADATA_KEY: TINY_SDXL_FAMILY}
    save_single_file(build_tiny_sdxl_pipeline(seed), path, dtype=torch.float32, metadata=metadata)
    return path


def write_tiny_inpainting_model(path: Path, seed: int = 0) -> Path:
    """The tiny pipeline with a 9-channel (inpainting) UNet, marked ``esd_family=tiny-sd15-inpainting``."""
    path = Path(path)
    metadata = {FAMILY_METADATA_KEY: TINY_INPAINT_FAMILY}
    save_single_file(build_tiny_pipeline(seed, inpainting=True), path, dtype=torch.float32, metadata=metadata)
    return path


def write_tiny_controlnet(path: Path, seed: int = 0, xl: bool = False) -> Path:
    """A ControlNet for the tiny SD (or SDXL) model in diffusers' layout, with random weights everywhere - its
    zero convolutions too, so that it changes images from the first step (a trained one learns them)."""
    from diffusers import ControlNetModel

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(TINY_SDXL_UNET if xl else TINY_UNET))
        net = ControlNetModel.from_unet(unet)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.2)
        torch.nn.init.normal_(net.controlnet_cond_embedding.conv_out.weight, std=1.0)  # the map must matter
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def write_tiny_upscaler(path: Path, seed: int = 0, scale: int = 4, arch: str = "ESRGAN") -> Path:
    """A tiny random upscaler in the layout its project publishes, for spandrel to detect from its keys:
    ``ESRGAN`` (RRDBNet, the ESRGAN/Real-ESRGAN family) or ``Compact`` (SRVGGNetCompact, realesr-general-x4v3).
    A ``.pth`` path is written with ``torch.save`` (as those projects ship them), otherwise as safetensors."""
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "Compact":
            net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=scale)
        else:  # random RRDBNet output is a near-black constant: the last conv gets a visible range and texture
            net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
            last = [p for name, p in net.named_parameters() if name.endswith(".weight")][-1]
            bias = [p for name, p in net.named_parameters() if name.endswith(".bias")][-1]
            with torch.no_grad():
                last.mul_(10)
                bias.fill_(0.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if path.suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


def write_tiny_annotator(path: Path, kind: str, seed: int = 0) -> Path:
    """A ControlNet annotator file with random weights in the published architecture and layout (a plain state
    dict, as lllyasviel/Annotators ships ``ControlNetHED.pth`` and ``sk_model.pth``): ``kind`` hed or lineart."""
    import warnings

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        if kind == "hed":
            from controlnet_aux.hed import ControlNetHED_Apache2

            net = ControlNetHED_Apache2()
        else:
            from controlnet_aux.lineart import Generator

            net = Generator(3, 1, 3)
    torch.save({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return Path(path)


def write_tiny_rembg(path: Path) -> Path:
    """A rembg model in ONNX whose mask is the image's red channel: a test can predict the cut exactly (a red
    subject on black keeps the red). rembg feeds any u2net/ISNet file the normalised RGB image, of any size here."""
    import onnx
    from onnx import TensorProto, helper

    size = ["batch", 3, "height", "width"]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input.1", "red"], ["mask"], kernel_shape=[1, 1])],
        "tiny-rembg",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, size)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "height", "width"])],
        [helper.make_tensor("red", TensorProto.FLOAT, [1, 3, 1, 1], [1.0, 0.0, 0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def write_tiny_model(path: Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and write it as an LDM single file, marked ``esd_family=tiny-sd15``.

    Stored in float32 (5.6 MB) rather than SD's usual float16 so that a CPU round trip is bit-exact: loading it
    gives exactly the images of ``build_tiny_pipeline(seed)``.
    """
    path = Path(path)
    save_single_file(build_tiny_pipeline(seed), path, dtype=torch.float32, metadata={FAMILY_METADATA_KEY: TINY_FAMILY})
    return path


# --- diffusers -> LDM single file -----------------------------------------------------------------------------

_RESNET_RENAMES = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_to_ldm(state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel -> ``model.diffusion_model.*`` (notes §1.2), for any block/layer count.

    LDM numbers every resnet/attention/downsampler of the encoder as ``input_blocks.N`` and of the decoder as
    ``output_blocks.N``; with L layers per block, down block i owns L+1 slots (L layers + its downsampler).
    """
    nb, n_layers = len(config["block_out_channels"]), config["layers_per_block"]
    attn_up = ["CrossAttn" in t for t in config["up_block_types"]]
    prefixes = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    step = n_layers + 1
    for i in range(nb):
        for j in range(n_layers):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{step * i + j + 1}.0."))
            prefixes.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{step * i + j + 1}.1."))
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{step * (i + 1)}.0.op."))
        for j in range(n_layers + 1):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{step * i + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{step * i + j}.1."))
        slot = 2 if attn_up[i] else 1
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{step * i + n_layers}.{slot}."))
    out = {}
    for key, value in state_dict.items():
        new = key
        for old_prefix, new_prefix in prefixes:
            if key.startswith(old_prefix):
                rest = key[len(old_prefix) :]
                if "resnets." in old_prefix:
                    for a, b in _RESNET_RENAMES:
                        rest = rest.replace(a, b)
                new = new_prefix + rest
                break
        out["model.diffusion_model." + new] = value
    return out


def _vae_to_ldm(state_dict: dict[str, torch.Tensor], config: Any, prefix: str) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM VAE keys (decoder blocks reversed, mid attention as 1x1 convs)."""
    nb, n_layers = len(config["block_out_channels"]), config["layers_per_block"]
    renames = [
        ("mid_block.attentions.0.", "mid.attn_1."),
        ("mid_block.resnets.0.", "mid.block_1."),
        ("mid_block.resnets.1.", "mid.block_2."),
        ("conv_norm_out.", "norm_out."),
    ]
    for i in range(nb):
        for j in range(n_layers):
            renames.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."))
        renames.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."))
        for j in range(n_layers + 1):
            renames.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{nb - 1 - i}.block.{j}."))
        renames.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{nb - 1 - i}.upsample."))
    attn = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
    out = {}
    for key, value in state_dict.items():
        new = key
        for a, b in renames:
            if a in new:
                new = new.replace(a, b)
                break
        new = new.replace("conv_shortcut", "nin_shortcut")
        if "attn_1." in new:
            for a, b in attn:
                new = new.replace(a, b)
            if value.ndim == 2:
                value = value[:, :, None, None]  # LDM's attention uses 1x1 convs
        out[prefix + new] = value
    return out


def _clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> ``<prefix>text_model.*`` (SD 1.x / SDXL CLIP-L).

    transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` in its keys); real files have it (notes §0.4).
    """
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in state_dict.items()}


_OPEN_CLIP_RENAMES = (
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)


def _open_clip_to_ldm(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP keys (``cond_stage_model.model.`` in SD 2.x, ``conditioner.embedders.1.model.``).

    The inverse of diffusers' ``convert_open_clip_checkpoint``: q/k/v are concatenated into ``in_proj_*`` and the
    projection is stored transposed (OpenCLIP multiplies ``x @ text_projection``).
    """
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {
        prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in sd:
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    layer = re.compile(r"encoder\.layers\.(\d+)\.(.*)")
    for key in sorted(sd):
        match = layer.fullmatch(key)
        if match is None:
            continue  # buffers such as position_ids
        i, rest = match.groups()
        block = f"{prefix}transformer.resblocks.{i}."
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]  # weight / bias
            parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            continue
        else:
            for a, b in _OPEN_CLIP_RENAMES:
                rest = rest.replace(a, b)
            out[block + rest] = sd[key]
    return out


def ldm_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The LDM single-file state dict of a pipeline (or any object with ``unet``/``vae``/``text_encoder[_2]``).

    The layout follows the pipeline: with ``text_encoder_2`` it is SDXL (CLIP-L under ``conditioner.embedders.0``,
    OpenCLIP-G under ``conditioner.embedders.1``); with a 1024-wide UNet context SD 2.x (OpenCLIP under
    ``cond_stage_model.model.``); otherwise SD 1.x. Works on meta-device models (keys and shapes only).
    """
    sd = _unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    sd.update(_vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config, "first_stage_model."))
    te_sd = pipe.text_encoder.state_dict()
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(_clip_to_ldm(te_sd, "conditioner.embedders.0.transformer."))
        sd.update(_open_clip_to_ldm(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    elif pipe.unet.config["cross_attention_dim"] == 1024:
        sd.update(_open_clip_to_ldm(te_sd, "cond_stage_model.model."))
    else:
        sd.update(_clip_to_ldm(te_sd, "cond_stage_model.transformer."))
    return sd


def save_single_file(
    pipe: Any, path: Path, dtype: torch.dtype = torch.float16, metadata: dict[str, str] | None = None
) -> int:
    """Write a pipeline as an LDM single ``.safetensors`` file (as A1111/civitai checkpoints are); return the
    number of tensors. ``metadata`` goes into the safetensors header (e.g. the ``esd_family`` marker)."""
    sd = {k: v.detach().to(dtype).contiguous() for k, v in ldm_state_dict(pipe).items()}
    save_file(sd, str(path), metadata=metadata)
    return len(sd)


# --- companion files: VAE, textual inversion, LoRA ------------------------------------------------------------


def write_tiny_vae(path: Path, seed: int = 1) -> Path:
    """A standalone tiny VAE file with LDM keys and no ``first_stage_model.`` prefix, like A1111's ``*.vae.*``.

    float32 so that loading it is bit-exact; ``build_tiny_vae(seed)`` rebuilds the same weights.
    """
    vae = build_tiny_vae(seed)
    sd = _vae_to_ldm(vae.state_dict(), vae.config, "")
    save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(path))
    return Path(path)


def write_tiny_sdxl_embedding(path: Path, token_vectors: int = 1, seed: int = 0) -> Path:
    """An SDXL textual-inversion file, ``{"clip_l": [n, 32], "clip_g": [n, 40]}``, for the tiny SDXL model."""
    generator = torch.Generator().manual_seed(seed)
    widths = {"clip_l": TINY_TEXT_ENCODER["hidden_size"], "clip_g": TINY_SDXL_TEXT_ENCODER_2["hidden_size"]}
    tensors = {name: torch.randn(token_vectors, width, generator=generator) for name, width in widths.items()}
    save_file(tensors, str(path))
    return Path(path)


def write_tiny_embedding(path: Path, token_vectors: int = 1, seed: int = 0) -> Path:
    """An A1111-style textual-inversion file, ``{"emb_params": tensor[token_vectors, 32]}``, for the tiny model."""
    generator = torch.Generator().manual_seed(seed)
    hidden = TINY_TEXT_ENCODER["hidden_size"]
    save_file({"emb_params": torch.randn(token_vectors, hidden, generator=generator)}, str(path))
    return Path(path)


def _lora_targets(module: torch.nn.Module, prefix: str, targets: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """kohya names (``<prefix><diffusers path with _>``) and modules of the layers kohya's LoRA wraps."""
    found = []
    for name, sub in module.named_modules():
        if prefix.startswith("lora_unet") and ".attentions." not in f".{name}":
            continue  # UNet LoRA only inside transformer blocks (proj_in/out, attention, feed-forward)
        if any(name == t or name.endswith("." + t) for t in targets) and isinstance(
            sub, torch.nn.Linear | torch.nn.Conv2d
        ):
            found.append((prefix + name.removeprefix("text_model.").replace(".", "_"), sub))
    return found


def write_tiny_lora(
    pipe_or_path: StableDiffusionPipeline | Path,
    path: Path,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> int:
    """A random kohya-format LoRA (notes §2) for the tiny model; returns the number of tensors written.

    Names are SD 1.x kohya names (diffusers module paths with ``_``: ``lora_unet_down_blocks_0_attentions_0_...``,
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``) with ``.lora_down.weight``, ``.lora_up.weight`` and
    ``.alpha``; up weights are random (not kohya's zero init) so the LoRA visibly changes outputs. Given a path to a
    tiny model file rather than a pipeline, the (seed-independent) tiny architecture is used.
    """
    if isinstance(pipe_or_path, str | Path):
        family = family_of_file(Path(pipe_or_path))
        if family != TINY_FAMILY:
            raise ValueError(f"write_tiny_lora needs a tiny model file, got family {family!r}")
        with torch.device("meta"):
            unet: torch.nn.Module = UNet2DConditionModel(**TINY_UNET)
            text_encoder: torch.nn.Module = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER))
    else:
        unet, text_encoder = pipe_or_path.unet, pipe_or_path.text_encoder
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules = _lora_targets(unet, "lora_unet_", LORA_UNET_TARGETS)
    modules += _lora_targets(text_encoder, "lora_te_text_model_", LORA_TE_TARGETS)
    for name, module in modules:
        if isinstance(module, torch.nn.Conv2d):  # 1x1 convs (proj_in/proj_out of SD 1.x): 4-D LoRA weights
            n_in, n_out, tail = module.in_channels, module.out_channels, (1, 1)
        else:
            n_in, n_out, tail = module.in_features, module.out_features, ()
        down = torch.randn(rank, n_in, *tail, generator=generator) / n_in**0.5
        up = torch.randn(n_out, rank, *tail, generator=generator) * 0.5
        tensors[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": TINY_FAMILY,
        "ss_output_name": Path(path).stem,
    }
    save_file(tensors, str(path), metadata=metadata)
    return len(tensors)
