"""kohya-compatible LoRA training on the runtime's offline pipelines (notes §2-§3), usable without any broker.

Why a reimplementation rather than kohya's sd-scripts: the runtime must load user checkpoints offline exactly as the
inference engine does (``from_single_file`` with a shipped config dir), run on the same pinned diffusers/peft stack,
report progress and honour cancellation between steps. What it must keep from kohya is the *interface*: the TOML
config ESD sends (all tables flattened, unknown keys ignored, ``max_train_epochs`` over ``max_train_steps``), the
dataset layout (``<repeats>_<name>/`` folders, captions beside the images), the file names it saves
(``{output_name}-{epoch:06d}.safetensors`` per ``save_every_n_epochs``, then ``{output_name}.safetensors``) and the
LoRA file format (kohya key names, ``.alpha``, ``ss_*`` metadata) so that A1111, ComfyUI and diffusers'
``load_lora_weights`` read the result. Every config key that is not honoured is reported as a warning.

The training itself follows diffusers' LoRA example with kohya's target set: peft LoRA adapters on every Linear /
1x1 conv inside the UNet's transformer blocks and on the CLIP attention/MLP projections, epsilon (or v) MSE loss
against a DDPM noise schedule built from the checkpoint's scheduler config.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a model hub

import tomllib

import torch

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "TrainResult",
    "TrainingCancelled",
    "TrainingConfig",
    "TrainingError",
    "load_dataset",
    "output_file_names",
    "train",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# kohya's LoRA targets (networks/lora.py): Linear/1x1-conv layers of the UNet's transformer blocks, CLIP attn/MLP.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MAX_TOKENS = 75  # one CLIP window without BOS/EOS

Progress = Callable[[dict], None]


class TrainingError(Exception):
    """The training cannot run as configured (bad config, dataset or model); the text says what to fix."""


class TrainingCancelled(Exception):
    """``should_stop()`` answered true between two steps; no final file was written."""


# --- config ------------------------------------------------------------------------------------------------------

# Keys whose value the runtime decides (paths, logging): accepted and ignored, reported once.
_RUNTIME_OWNED = (
    "output_dir",
    "train_data_dir",
    "pretrained_model_name_or_path",
    "logging_dir",
    "log_prefix",
    "log_with",
    "log_tracker_name",
    "log_tracker_config",
    "wandb_api_key",
    "wandb_run_name",
    "huggingface_repo_id",
    "huggingface_repo_type",
    "huggingface_path_in_repo",
    "huggingface_token",
    "huggingface_repo_visibility",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "async_upload",
    "config_file",
    "output_config",
    "tokenizer_cache_dir",
)
# Keys about speed or memory only: the result is the same without them. Reported only when switched on.
_NO_EFFECT = {
    "xformers": "attention always uses PyTorch SDPA",
    "sdpa": "attention always uses PyTorch SDPA",
    "mem_eff_attn": "attention always uses PyTorch SDPA",
    "lowram": "no effect on this runtime",
    "lowvram": "no effect on this runtime",
    "highvram": "no effect on this runtime",
    "max_data_loader_n_workers": "images are preloaded in memory",
    "persistent_data_loader_workers": "images are preloaded in memory",
    "vae_batch_size": "latents are encoded one image at a time",
    "cache_text_encoder_outputs": "text encoder outputs are not cached",
    "cache_text_encoder_outputs_to_disk": "text encoder outputs are not cached",
    "ddp_timeout": "single-device training",
    "ddp_gradient_as_bucket_view": "single-device training",
    "ddp_static_graph": "single-device training",
    "console_log_level": "no effect on this runtime",
    "console_log_file": "no effect on this runtime",
    "console_log_simple": "no effect on this runtime",
}
# Features this trainer does not implement: ignored with a warning when switched on.
_UNSUPPORTED = {
    "network_args": "network arguments (LoCon conv_dim, block weights, ...) are not supported: plain LoRA is trained",
    "network_dropout": "LoRA dropout is not supported",
    "rank_dropout": "LoRA dropout is not supported",
    "module_dropout": "LoRA dropout is not supported",
    "network_weights": "training always starts from a new LoRA",
    "dim_from_weights": "training always starts from a new LoRA",
    "base_weights": "merging base LoRA weights is not supported",
    "base_weights_multiplier": "merging base LoRA weights is not supported",
    "scale_weight_norms": "max-norm regularisation is not supported",
    "flip_aug": "image augmentation is not supported",
    "color_aug": "image augmentation is not supported",
    "random_crop": "images are center-cropped",
    "face_crop_aug_range": "image augmentation is not supported",
    "caption_dropout_rate": "caption dropout is not supported",
    "caption_dropout_every_n_epochs": "caption dropout is not supported",
    "caption_tag_dropout_rate": "caption dropout is not supported",
    "secondary_separator": "caption wildcards are not supported",
    "enable_wildcard": "caption wildcards are not supported",
    "keep_tokens_separator": "caption wildcards are not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "reg_data_dir": "regularization images are not supported",
    "in_json": "fine-tuning metadata datasets are not supported: use <repeats>_<name> folders",
    "dataset_config": "dataset config files are not supported: use <repeats>_<name> folders",
    "dataset_repeats": "repeats come from the folder names",
    "sample_every_n_epochs": "sample images are not generated",
    "sample_every_n_steps": "sample images are not generated",
    "sample_prompts": "sample images are not generated",
    "sample_at_first": "sample images are not generated",
    "sample_sampler": "sample images are not generated",
    "save_every_n_steps": "files are saved per epoch only",
    "save_n_epoch_ratio": "files are saved per save_every_n_epochs only",
    "save_last_n_steps": "files are saved per epoch only",
    "save_state": "training state is not saved",
    "save_state_on_train_end": "training state is not saved",
    "save_last_n_epochs_state": "training state is not saved",
    "save_last_n_steps_state": "training state is not saved",
    "resume": "resuming is not supported",
    "multires_noise_iterations": "multi-resolution noise is not supported",
    "multires_noise_discount": "multi-resolution noise is not supported",
    "adaptive_noise_scale": "adaptive noise scale is not supported",
    "noise_offset_random_strength": "random noise-offset strength is not supported",
    "ip_noise_gamma": "input perturbation noise is not supported",
    "ip_noise_gamma_random_strength": "input perturbation noise is not supported",
    "zero_terminal_snr": "zero terminal SNR is not supported",
    "debiased_estimation_loss": "debiased estimation loss is not supported",
    "scale_v_pred_loss_like_noise_pred": "v-prediction loss scaling is not supported",
    "v_pred_like_loss": "v-prediction-like loss is not supported",
    "huber_c": "only the l2 loss is supported",
    "huber_schedule": "only the l2 loss is supported",
    "masked_loss": "masked loss is not supported",
    "alpha_mask": "masked loss is not supported",
    "weighted_captions": "weighted captions are not supported",
    "full_fp16": "LoRA weights are trained in float32 (mixed precision applies to the frozen model)",
    "full_bf16": "LoRA weights are trained in float32 (mixed precision applies to the frozen model)",
    "fp8_base": "fp8 base weights are not supported",
    "fp8_base_unet": "fp8 base weights are not supported",
    "vae": "a separate VAE is not supported: the checkpoint's VAE is used",
    "lr_scheduler_type": "custom scheduler classes are not supported",
    "lr_scheduler_args": "scheduler arguments are not supported",
    "lr_decay_steps": "not supported by the diffusers schedulers",
    "lr_scheduler_min_lr_ratio": "not supported by the diffusers schedulers",
    "lr_scheduler_timescale": "not supported by the diffusers schedulers",
    "no_metadata": "ss_* metadata is always written",
    "training_comment_file": "not supported",
    "max_bucket_reso": "aspect-ratio buckets are not implemented",
    "min_bucket_reso": "aspect-ratio buckets are not implemented",
    "bucket_reso_steps": "aspect-ratio buckets are not implemented",
    "bucket_no_upscale": "aspect-ratio buckets are not implemented",
}
# Keys this trainer reads (honoured, or approximated with their own warning).
_HONOURED = frozenset(
    {
        "output_name",
        "max_train_epochs",
        "max_train_steps",
        "save_every_n_epochs",
        "save_last_n_epochs",
        "save_model_as",
        "save_precision",
        "network_module",
        "network_dim",
        "network_alpha",
        "network_train_unet_only",
        "network_train_text_encoder_only",
        "learning_rate",
        "unet_lr",
        "text_encoder_lr",
        "train_batch_size",
        "resolution",
        "seed",
        "caption_extension",
        "caption_extention",
        "caption_prefix",
        "caption_suffix",
        "caption_separator",
        "shuffle_caption",
        "keep_tokens",
        "max_token_length",
        "mixed_precision",
        "no_half_vae",
        "optimizer_type",
        "optimizer_args",
        "use_8bit_adam",
        "use_lion_optimizer",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_scheduler_num_cycles",
        "lr_scheduler_power",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "max_grad_norm",
        "clip_skip",
        "noise_offset",
        "min_snr_gamma",
        "min_timestep",
        "max_timestep",
        "loss_type",
        "v2",
        "v_parameterization",
        "cache_latents",
        "cache_latents_to_disk",
        "enable_bucket",
        "prior_loss_weight",
        "training_comment",
    }
)


def _flatten(data: Mapping[str, Any], out: dict[str, Any], warnings: list[str], path: str = "") -> dict[str, Any]:
    """kohya flattens every table into one namespace; nested tables (older ESD shapes) are flattened too.

    A key that appears in two tables keeps the later value, as in kohya; a conflict is reported.
    """
    for key, value in data.items():
        where = f"{path}{key}"
        if isinstance(value, Mapping):
            _flatten(value, out, warnings, f"{where}.")
            continue
        if key in out and out[key] != value:
            warnings.append(f"{key} is set twice with different values; {where} = {value!r} wins")
        out[key] = value
    return out


def _unset(value: Any) -> bool:
    """kohya's ``None``: TOML has no null, so configs written by GUIs use empty strings."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "none"))


def _number(raw: Mapping[str, Any], key: str, default: Any, kind: type, minimum: float | None = None) -> Any:
    """A numeric option, accepting numbers written as strings ("1e-4"); garbage is a TrainingError."""
    value = raw.get(key)
    if _unset(value):
        return default
    if isinstance(value, bool):
        raise TrainingError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, int | float) or math.isnan(number):
            raise ValueError
        if kind is int:
            if number != int(number):
                raise ValueError
            number = int(number)
        else:
            number = float(number)
    except (TypeError, ValueError, OverflowError):
        raise TrainingError(f"{key} must be {'a whole number' if kind is int else 'a number'}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise TrainingError(f"{key} must be at least {minimum}, got {value!r}")
    return number


def _flag(raw: Mapping[str, Any], key: str, default: bool = False) -> bool:
    """A boolean option; TOML booleans, 0/1 and "true"/"false" strings are accepted, anything else is an error."""
    value = raw.get(key)
    if _unset(value):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise TrainingError(f"{key} must be true or false, got {value!r}")


def _text(raw: Mapping[str, Any], key: str, default: str | None) -> str | None:
    """A string option (numbers are accepted and turned into strings, as argparse would)."""
    value = raw.get(key)
    if _unset(value):
        return default
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise TrainingError(f"{key} must be a string, got {value!r}")
    return str(value)


def _truthy(value: Any) -> bool:
    """Whether an unsupported option is switched on (kohya's defaults are all false/zero/empty)."""
    if _unset(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "0.0", "no", "[]")
    return bool(value)


def _resolution(value: Any) -> tuple[int, int]:
    """kohya's ``resolution``: ``"512,512"`` (width,height), ``"512"``, ``512`` or ``[512, 512]``."""
    if _unset(value):
        return 512, 512
    if isinstance(value, bool):
        raise TrainingError(f'resolution must be like 512 or "512,512", got {value!r}')
    parts: list[Any]
    if isinstance(value, int | float):
        parts = [value]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",")]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise TrainingError(f'resolution must be like 512 or "512,512", got {value!r}')
    try:
        sizes = [int(p) for p in parts if not isinstance(p, bool) and float(p) == int(p)]
    except (TypeError, ValueError):
        raise TrainingError(f'resolution must be like 512 or "512,512", got {value!r}') from None
    if len(sizes) != len(parts) or len(sizes) not in (1, 2):
        raise TrainingError(f'resolution must be like 512 or "512,512", got {value!r}')
    if len(sizes) == 1:
        sizes *= 2
    width, height = sizes
    if not (64 <= width <= 4096 and 64 <= height <= 4096) or width % 8 or height % 8:
        raise TrainingError(f"resolution {width}x{height} must be multiples of 8 between 64 and 4096")
    return width, height


def _file_name(value: str, key: str) -> str:
    """An output name becomes a file name: one path segment, no control characters."""
    if (
        not value
        or len(value) > 200
        or "/" in value
        or "\\" in value
        or value in (".", "..")
        or any(ord(c) < 32 for c in value)
    ):
        raise TrainingError(f"{key} {value!r} is not a valid file name")
    return value


def _optimizer_args(value: Any) -> dict[str, Any]:
    """kohya's ``optimizer_args``: a list of ``key=value`` strings (values are Python literals)."""
    import ast

    if _unset(value):
        return {}
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise TrainingError(f"optimizer_args must be a list of key=value strings, got {value!r}")
    kwargs: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise TrainingError(f"optimizer_args entries must look like key=value, got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


@dataclass
class TrainingConfig:
    """A kohya ``train_network.py`` config, flattened and checked, with kohya's defaults where a key is missing.

    ``warnings`` lists every key that is set but not honoured (or only approximated); it becomes the job log.
    """

    output_name: str = "last"
    epoch_name: str = "epoch"
    max_train_epochs: int | None = None
    max_train_steps: int = 1600
    save_every_n_epochs: int | None = None
    save_last_n_epochs: int | None = None
    save_precision: str = "float"
    network_dim: int = 4
    network_alpha: float = 1.0
    train_unet: bool = True
    train_text_encoder: bool = True
    learning_rate: float = 2e-6
    unet_lr: float = 2e-6
    text_encoder_lr: float = 2e-6
    train_batch_size: int = 1
    resolution: tuple[int, int] = (512, 512)
    seed: int | None = None
    caption_extension: str = ".caption"
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_separator: str = ","
    shuffle_caption: bool = False
    keep_tokens: int = 0
    max_token_length: int | None = None
    mixed_precision: str = "no"
    optimizer_type: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    clip_skip: int | None = None
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    min_timestep: int = 0
    max_timestep: int = 1000
    v2: bool = False
    v_parameterization: bool | None = None
    cache_latents: bool = False
    enable_bucket: bool = False
    prior_loss_weight: float = 1.0
    training_comment: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_toml(cls, path: Path) -> TrainingConfig:
        """Parse a kohya TOML file (ESD's merged ``kohya_config_cloud*.toml``)."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise TrainingError(f"the training config could not be read: {exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise TrainingError(f"the training config is not valid TOML: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Parse a kohya config already read into a dict (nested tables allowed); every problem is a
        :class:`TrainingError` naming the key."""
        warnings: list[str] = []
        raw = _flatten(data, {}, warnings)
        c = cls(raw=raw, warnings=warnings)

        network_module = _text(raw, "network_module", "networks.lora")
        if network_module != "networks.lora":
            raise TrainingError(
                f"network_module {network_module!r} is not supported: this runtime trains networks.lora only"
            )
        save_as = (_text(raw, "save_model_as", "safetensors") or "").lower()
        if save_as != "safetensors":
            raise TrainingError(f"save_model_as {save_as!r} is not supported: only safetensors is written")

        name = _text(raw, "output_name", None)
        if name is not None:
            c.output_name = c.epoch_name = _file_name(name, "output_name")
        epochs = _number(raw, "max_train_epochs", None, int, 1)
        c.max_train_epochs = epochs
        c.max_train_steps = _number(raw, "max_train_steps", 1600, int, 1)
        c.save_every_n_epochs = _number(raw, "save_every_n_epochs", None, int, 1)
        c.save_last_n_epochs = _number(raw, "save_last_n_epochs", None, int, 1)
        precision = (_text(raw, "save_precision", "float") or "float").lower()
        if precision in ("fp32", "float32", "no"):
            precision = "float"
        if precision not in ("float", "fp16", "bf16"):
            raise TrainingError(f"save_precision must be float, fp16 or bf16, got {precision!r}")
        c.save_precision = precision

        c.network_dim = _number(raw, "network_dim", 4, int, 1)
        c.network_alpha = _number(raw, "network_alpha", 1.0, float, 0) or float(c.network_dim)  # kohya: 0 = dim
        unet_only = _flag(raw, "network_train_unet_only")
        te_only = _flag(raw, "network_train_text_encoder_only")
        if unet_only and te_only:
            raise TrainingError("network_train_unet_only and network_train_text_encoder_only cannot both be true")
        c.train_unet, c.train_text_encoder = not te_only, not unet_only
        c.learning_rate = _number(raw, "learning_rate", 2e-6, float, 0)
        c.unet_lr = _number(raw, "unet_lr", c.learning_rate, float, 0)
        c.text_encoder_lr = _number(raw, "text_encoder_lr", c.learning_rate, float, 0)

        c.train_batch_size = _number(raw, "train_batch_size", 1, int, 1)
        c.resolution = _resolution(raw.get("resolution"))
        c.seed = _number(raw, "seed", None, int, 0)
        ext = _text(raw, "caption_extension", None) or _text(raw, "caption_extention", None) or ".caption"
        c.caption_extension = ext if ext.startswith(".") else f".{ext}"
        c.caption_prefix = _text(raw, "caption_prefix", "") or ""
        c.caption_suffix = _text(raw, "caption_suffix", "") or ""
        c.caption_separator = _text(raw, "caption_separator", ",") or ","
        c.shuffle_caption = _flag(raw, "shuffle_caption")
        c.keep_tokens = _number(raw, "keep_tokens", 0, int, 0)
        c.max_token_length = _number(raw, "max_token_length", None, int, 1)
        if c.max_token_length is not None and c.max_token_length > MAX_TOKENS:
            warnings.append(
                f"max_token_length={c.max_token_length}: captions are encoded in one {MAX_TOKENS}-token CLIP window "
                "(longer captions are truncated)"
            )

        mixed = (_text(raw, "mixed_precision", "no") or "no").lower()
        if mixed not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be no, fp16 or bf16, got {mixed!r}")
        c.mixed_precision = mixed

        c.optimizer_type = _text(raw, "optimizer_type", "") or ""
        if not c.optimizer_type:
            if _flag(raw, "use_8bit_adam"):
                c.optimizer_type = "AdamW8bit"
            elif _flag(raw, "use_lion_optimizer"):
                c.optimizer_type = "Lion"
            else:
                c.optimizer_type = "AdamW"
        c.optimizer_args = _optimizer_args(raw.get("optimizer_args"))
        scheduler = (_text(raw, "lr_scheduler", "constant") or "constant").lower()
        if scheduler not in SCHEDULERS:
            warnings.append(f"lr_scheduler {scheduler!r} is not supported: constant is used")
            scheduler = "constant"
        c.lr_scheduler = scheduler
        c.lr_warmup_steps = _number(raw, "lr_warmup_steps", 0, float, 0)
        c.lr_scheduler_num_cycles = _number(raw, "lr_scheduler_num_cycles", 1, int, 1)
        c.lr_scheduler_power = _number(raw, "lr_scheduler_power", 1.0, float, 0)
        c.gradient_accumulation_steps = _number(raw, "gradient_accumulation_steps", 1, int, 1)
        c.gradient_checkpointing = _flag(raw, "gradient_checkpointing")
        c.max_grad_norm = _number(raw, "max_grad_norm", 1.0, float, 0)
        c.clip_skip = _number(raw, "clip_skip", None, int, 1)
        c.noise_offset = _number(raw, "noise_offset", 0.0, float, 0)
        c.min_snr_gamma = _number(raw, "min_snr_gamma", None, float, 0) or None
        c.min_timestep = _number(raw, "min_timestep", 0, int, 0)
        c.max_timestep = _number(raw, "max_timestep", 1000, int, 1)
        if c.min_timestep >= c.max_timestep:
            raise TrainingError("min_timestep must be smaller than max_timestep")
        loss_type = (_text(raw, "loss_type", "l2") or "l2").lower()
        if loss_type != "l2":
            warnings.append(f"loss_type {loss_type!r} is not supported: the l2 loss is used")
        c.v2 = _flag(raw, "v2")
        c.v_parameterization = _flag(raw, "v_parameterization") if not _unset(raw.get("v_parameterization")) else None
        c.cache_latents = _flag(raw, "cache_latents") or _flag(raw, "cache_latents_to_disk")
        if _flag(raw, "cache_latents_to_disk"):
            warnings.append("cache_latents_to_disk: latents are cached in memory instead")
        c.enable_bucket = _flag(raw, "enable_bucket")
        if c.enable_bucket:
            width, height = c.resolution
            warnings.append(
                "enable_bucket: aspect-ratio buckets are not implemented; every image is resized and "
                f"center-cropped to {width}x{height}"
            )
        c.prior_loss_weight = _number(raw, "prior_loss_weight", 1.0, float, 0)
        c.training_comment = _text(raw, "training_comment", None)

        owned = sorted(k for k in raw if k in _RUNTIME_OWNED and not _unset(raw[k]))
        if owned:
            warnings.append(f"ignored, the runtime decides these: {', '.join(owned)}")
        for key in sorted(raw):
            if key in _NO_EFFECT and _truthy(raw[key]):
                warnings.append(f"{key} is ignored: {_NO_EFFECT[key]}")
            elif key in _UNSUPPORTED and _truthy(raw[key]):
                if c.enable_bucket and (key.endswith("bucket_reso") or key.startswith("bucket_")):
                    continue  # covered by the enable_bucket warning
                warnings.append(f"{key} is ignored: {_UNSUPPORTED[key]}")
        unknown = sorted(k for k in raw if k not in _HONOURED and k not in _RUNTIME_OWNED)
        unknown = [k for k in unknown if k not in _NO_EFFECT and k not in _UNSUPPORTED]
        if unknown:
            warnings.append(f"unknown options ignored (not kohya train_network arguments): {', '.join(unknown)}")
        return c

    def epoch_file(self, epoch: int) -> str:
        """kohya's per-epoch file name (``{output_name}-{epoch:06d}.safetensors``)."""
        return f"{self.epoch_name}-{epoch:06d}.safetensors"

    def final_file(self) -> str:
        """kohya's final file name (``{output_name}.safetensors``)."""
        return f"{self.output_name}.safetensors"


def output_file_names(config: TrainingConfig, epochs: int) -> list[str]:
    """Every file a run of ``epochs`` epochs may write (before ``save_last_n_epochs`` deletes older ones), so a
    caller can presign an upload URL for each."""
    names = []
    if config.save_every_n_epochs:
        names += [config.epoch_file(e) for e in range(1, epochs) if e % config.save_every_n_epochs == 0]
    return [*names, config.final_file()]


# --- dataset -----------------------------------------------------------------------------------------------------


@dataclass
class TrainImage:
    """One training image, resized and center-cropped to the training resolution (uint8 CHW), with its caption."""

    path: Path
    folder: str
    repeats: int
    caption: str
    pixels: torch.Tensor
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL's size conditioning
    crop_top_left: tuple[int, int]


_FOLDER = re.compile(r"^(\d+)_(.+)$")


def _read_caption(path: Path) -> str | None:
    """kohya reads the first non-empty line of the caption file."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"caption {path.name} could not be read: {exc}") from exc
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _load_image(path: Path, width: int, height: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize so the image covers width x height, then center-crop (kohya's behaviour without buckets)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise TrainingError(f"image {path.parent.name}/{path.name} could not be read: {exc}") from exc
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return pixels, (h, w), (top, left)


def load_dataset(dataset_dir: Path, config: TrainingConfig, warnings: list[str] | None = None) -> list[TrainImage]:
    """Read a kohya dataset folder: ``<repeats>_<name>/`` subfolders of images with ``<stem><caption_extension>``
    captions. Images directly in ``dataset_dir`` or in folders without a repeats prefix count once (with a
    warning); an image without a caption file is captioned with its folder's name, as kohya does."""
    warnings = warnings if warnings is not None else []
    root = Path(dataset_dir)
    if not root.is_dir():
        raise TrainingError(f"the dataset folder {root} does not exist")
    width, height = config.resolution
    groups: list[tuple[Path, str, int]] = []
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        groups.append((root, root.name, 1))
        warnings.append(
            "images directly in the dataset folder are used with 1 repeat (kohya expects <repeats>_<name>/)"
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _FOLDER.match(folder.name)
        if match is None:
            warnings.append(f"folder {folder.name} has no <repeats>_ prefix: its images are used with 1 repeat")
            groups.append((folder, folder.name, 1))
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            warnings.append(f"folder {folder.name} has 0 repeats: its images are not used")
            continue
        groups.append((folder, match.group(2), repeats))
    images: list[TrainImage] = []
    uncaptioned: list[str] = []
    for folder, class_name, repeats in groups:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        for path in files:
            caption = _read_caption(path.with_name(path.stem + config.caption_extension))
            if caption is None:
                uncaptioned.append(f"{folder.name}/{path.name}")
                caption = class_name
            pixels, original, crop = _load_image(path, width, height)
            images.append(TrainImage(path, folder.name, repeats, caption, pixels, original, crop))
    if not images:
        raise TrainingError(
            f"the dataset has no images ({', '.join(IMAGE_EXTENSIONS)}) in {root.name} or its <repeats>_<name> folders"
        )
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        warnings.append(
            f"{len(uncaptioned)} image(s) have no {config.caption_extension} caption and use their folder name: "
            + shown
        )
    return images


def _tag_frequency(images: list[TrainImage], separator: str) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how many images carry each comma-separated tag."""
    frequency: dict[str, Counter] = {}
    for image in images:
        counter = frequency.setdefault(image.folder, Counter())
        for tag in image.caption.split(separator):
            if tag.strip():
                counter[tag.strip()] += 1
    return {folder: dict(counter) for folder, counter in frequency.items()}


def _caption(image: TrainImage, config: TrainingConfig, rng: random.Random) -> str:
    """The caption one step sees: prefix/suffix, then kohya's shuffle that keeps the first ``keep_tokens`` tags."""
    caption = image.caption
    if config.caption_prefix:
        caption = f"{config.caption_prefix} {caption}"
    if config.caption_suffix:
        caption = f"{caption} {config.caption_suffix}"
    if config.shuffle_caption:
        tags = [t.strip() for t in caption.split(config.caption_separator)]
        fixed, rest = tags[: config.keep_tokens], tags[config.keep_tokens :]
        rng.shuffle(rest)
        caption = ", ".join(t for t in fixed + rest if t)
    return caption


# --- model -------------------------------------------------------------------------------------------------------


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


# --- optimizer and schedule ----------------------------------------------------------------------------------------


def _optimizer(
    config: TrainingConfig, groups: list[dict[str, Any]], device: str, warnings: list[str]
) -> tuple[torch.optim.Optimizer, str]:
    """kohya's ``optimizer_type`` where this host can provide it, else AdamW with a warning."""
    import importlib

    wanted = config.optimizer_type
    kind = wanted.lower()
    kwargs = dict(config.optimizer_args)
    optimizer_class: Any = torch.optim.AdamW

    def optional(module: str, attribute: str, needs_cuda: bool = False) -> Any:
        if needs_cuda and not device.startswith("cuda"):
            warnings.append(f"optimizer {wanted} needs CUDA: AdamW is used")
            return None
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError, RuntimeError):
            warnings.append(
                f"optimizer {wanted} needs the {module.split('.')[0]} package, not installed: AdamW is used"
            )
            return None

    if kind == "adamw":
        pass
    elif kind in ("adamw8bit", "pagedadamw8bit", "pagedadamw", "pagedadamw32bit", "lion8bit", "pagedlion8bit"):
        names = {
            "adamw8bit": "AdamW8bit",
            "pagedadamw8bit": "PagedAdamW8bit",
            "pagedadamw": "PagedAdamW",
            "pagedadamw32bit": "PagedAdamW32bit",
            "lion8bit": "Lion8bit",
            "pagedlion8bit": "PagedLion8bit",
        }
        optimizer_class = optional("bitsandbytes.optim", names[kind], needs_cuda=True) or torch.optim.AdamW
    elif kind == "lion":
        optimizer_class = optional("lion_pytorch", "Lion") or torch.optim.AdamW
    elif kind == "prodigy":
        optimizer_class = optional("prodigyopt", "Prodigy") or torch.optim.AdamW
    elif kind in ("sgdnesterov", "sgdnesterov8bit"):
        if kind.endswith("8bit"):
            warnings.append(f"optimizer {wanted}: the 32-bit SGD with Nesterov momentum is used")
        kwargs.setdefault("momentum", 0.9)
        kwargs["nesterov"] = True
        optimizer_class = torch.optim.SGD
    elif kind.startswith("torch.optim.") and isinstance(getattr(torch.optim, wanted.rsplit(".", 1)[1], None), type):
        optimizer_class = getattr(torch.optim, wanted.rsplit(".", 1)[1])
    else:
        warnings.append(f"optimizer {wanted} is not supported: AdamW is used")
    if optimizer_class is torch.optim.AdamW and kind != "adamw":
        kwargs = {k: v for k, v in kwargs.items() if k in ("weight_decay", "betas", "eps", "amsgrad")}
        highest = max(group["lr"] for group in groups)
        if highest >= 0.1:  # Prodigy/D-Adaptation configs use lr=1.0, which would wreck an AdamW run
            raise TrainingError(
                f"optimizer {wanted} is not available here and its learning rate {highest} is far too high for the "
                'AdamW fallback: set optimizer_type = "AdamW" with a learning rate such as 1e-4'
            )
    try:
        optimizer = optimizer_class(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"optimizer {wanted} rejected optimizer_args {config.optimizer_args}: {exc}") from exc
    described = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    if kwargs:
        described += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return optimizer, described


def _lr_schedule(config: TrainingConfig, optimizer: torch.optim.Optimizer, steps: int, warnings: list[str]) -> Any:
    """``diffusers.optimization.get_scheduler`` with kohya's warm-up semantics (a value below 1 is a ratio)."""
    from diffusers.optimization import get_scheduler

    warmup = config.lr_warmup_steps
    warmup_steps = int(warmup * steps) if 0 < warmup < 1 else int(warmup)
    if config.lr_scheduler == "constant" and warmup_steps:
        warnings.append("lr_warmup_steps is ignored with lr_scheduler constant (use constant_with_warmup)")
    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=steps,
        num_cycles=config.lr_scheduler_num_cycles,
        power=config.lr_scheduler_power,
    )


# --- training ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a finished training produced: the files (epoch files first, the final file last) and its log."""

    files: list[Path]
    warnings: list[str]
    loss: float
    seconds: float
    steps: int
    epochs: int
    family: str
    seed: int


def _resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error rather than a crash later."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device} was asked for but CUDA is not available")
    return device


def _weight_dtype(config: TrainingConfig, device: str, warnings: list[str]) -> torch.dtype:
    """Frozen weights in the mixed precision on CUDA; always float32 on CPU (half precision is slow or missing)."""
    if config.mixed_precision == "no":
        return torch.float32
    if not device.startswith("cuda"):
        warnings.append(f"mixed_precision {config.mixed_precision} is ignored on CPU: training runs in float32")
        return torch.float32
    if config.mixed_precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise TrainingError("mixed_precision bf16 is not supported by this GPU")
        return torch.bfloat16
    return torch.float16


class _Encoder:
    """Captions -> UNet conditioning (prompt embeddings; for SDXL also pooled embeddings), as kohya computes it."""

    def __init__(self, model: _Model, config: TrainingConfig, device: str, warnings: list[str]):
        self.model = model
        self.device = device
        self.clip_skip = config.clip_skip or 1
        if model.xl and config.clip_skip and config.clip_skip > 1:
            warnings.append("clip_skip is ignored for SDXL (its penultimate layers are always used)")

    def _ids(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders, tokenizers = self.model.text_encoders, self.model.tokenizers
        if not self.model.xl:
            encoder = encoders[0]
            output = encoder(self._ids(tokenizers[0], captions), output_hidden_states=True)
            if self.clip_skip <= 1:
                return output.last_hidden_state, None
            norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            return norm(output.hidden_states[-self.clip_skip]), None
        first = encoders[0](self._ids(tokenizers[0], captions), output_hidden_states=True)
        second = encoders[1](self._ids(tokenizers[1], captions), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds


def train(
    config_path: Path,
    model_path: Path,
    dataset_dir: Path,
    output_dir: Path,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    work_dir: Path | None = None,
) -> TrainResult:
    """Train a kohya-format LoRA for ``model_path`` on ``dataset_dir`` as ``config_path`` says; write the epoch
    files and the final file into ``output_dir``.

    ``on_progress({"epoch", "epochs", "step", "steps", "loss"})`` is called after every optimizer step (``loss`` is
    the running mean of the current epoch, like kohya's ``avr_loss``); ``should_stop()`` is checked before every
    step and stops the run with :class:`TrainingCancelled` (no final file). Deterministic for a given ``seed`` on
    CPU; the caller's global RNG state is left as it was. ``work_dir`` holds the offline config dirs.
    """
    started_at = time.time()
    config = TrainingConfig.from_toml(Path(config_path))
    warnings = list(config.warnings)
    device = _resolve_device(device)
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    if config.seed is None:
        warnings.append(f"no seed given: using {seed}")
    images = load_dataset(Path(dataset_dir), config, warnings)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()) / "esd-trainer"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        return _train(
            config, Path(model_path), images, output_dir, work_dir, device, seed, warnings, started_at,
            on_progress, should_stop,
        )  # fmt: skip


def _train(
    config: TrainingConfig,
    model_path: Path,
    images: list[TrainImage],
    output_dir: Path,
    work_dir: Path,
    device: str,
    seed: int,
    warnings: list[str],
    started_at: float,
    on_progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """The training loop proper (see :func:`train`); runs inside a forked, seeded RNG."""
    weight_dtype = _weight_dtype(config, device, warnings)
    model = _load_model(model_path, work_dir / "configs", device, weight_dtype)
    width, height = config.resolution
    factor = 8 * 2 ** (len(model.unet.config["block_out_channels"]) - 1)
    if width % factor or height % factor:
        raise TrainingError(f"resolution {width}x{height} must be a multiple of {factor} for this model")
    if config.v2 and model.family != "sd2":
        warnings.append(f"v2 is set but the checkpoint is a {model.family} model: trained as {model.family}")
    if config.prior_loss_weight != 1.0:
        warnings.append("prior_loss_weight has no effect: regularization images are not supported")

    scheduler = model.noise_scheduler
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if config.v_parameterization is not None:
        prediction = "v_prediction" if config.v_parameterization else "epsilon"
    max_timestep = min(config.max_timestep, scheduler.config.num_train_timesteps)

    # adapters
    params_unet: list[torch.nn.Parameter] = []
    params_text: list[torch.nn.Parameter] = []
    if config.train_unet:
        params_unet = _add_lora(model.unet, _target_modules(model.unet, UNET_TARGETS, unet=True), config)
    if config.train_text_encoder:
        for encoder in model.text_encoders:
            params_text += _add_lora(encoder, _target_modules(encoder, TEXT_TARGETS, unet=False), config)
    if not params_unet and not params_text:
        raise TrainingError("the model has no layers kohya's LoRA can train")
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in model.text_encoders:
                _checkpoint_text_encoder(encoder)
    model.unet.train(config.train_unet)
    for encoder in model.text_encoders:
        encoder.train(config.train_text_encoder)

    # schedule: steps = epochs x ceil(ceil(images x repeats / batch) / gradient accumulation)
    samples = sum(image.repeats for image in images)
    batches_per_epoch = math.ceil(samples / config.train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_train_epochs:
        epochs = config.max_train_epochs
        total_steps = epochs * steps_per_epoch
    else:
        total_steps = config.max_train_steps
        epochs = math.ceil(total_steps / steps_per_epoch)

    groups = []
    if params_unet:
        groups.append({"params": params_unet, "lr": config.unet_lr})
    if params_text:
        groups.append({"params": params_text, "lr": config.text_encoder_lr})
    optimizer, optimizer_name = _optimizer(config, groups, device, warnings)
    lr_schedule = _lr_schedule(config, optimizer, total_steps, warnings)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    autocast = device.startswith("cuda") and weight_dtype != torch.float32
    trainable = params_unet + params_text

    generator = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)
    encode = _Encoder(model, config, device, warnings)
    vae = model.vae
    scaling = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0

    def latents_of(batch: list[TrainImage]) -> torch.Tensor:
        pixels = torch.stack([image.pixels for image in batch]).to(device=device, dtype=torch.float32)
        pixels = pixels / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device)
            latents = dist.mean + dist.std * noise
        return (latents - shift) * scaling

    cache: dict[int, torch.Tensor] = {}
    if config.cache_latents:
        for index, image in enumerate(images):
            cache[index] = latents_of([image])[0]

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    metadata = _metadata(
        config, model, images, seed, epochs, total_steps, batches_per_epoch, optimizer_name, started_at
    )
    metadata["ss_sd_model_name"] = model_path.name
    written: list[Path] = []
    epoch_files: list[Path] = []
    step = 0
    loss_value = float("nan")
    for epoch in range(1, epochs + 1):
        order = [index for index, image in enumerate(images) for _ in range(image.repeats)]
        rng.shuffle(order)
        batches = [order[i : i + config.train_batch_size] for i in range(0, len(order), config.train_batch_size)]
        epoch_losses: list[float] = []
        for number, batch_indexes in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
            batch = [images[i] for i in batch_indexes]
            latents = torch.stack([cache[i] for i in batch_indexes]) if cache else latents_of(batch)
            captions = [_caption(image, config, rng) for image in batch]
            noise = torch.randn(latents.shape, generator=generator)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
            noise = noise.to(device)
            timesteps = torch.randint(config.min_timestep, max_timestep, (len(batch),), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(device_type="cuda", dtype=weight_dtype, enabled=autocast):
                with torch.set_grad_enabled(config.train_text_encoder):
                    hidden, pooled = encode(captions)
                extra = {}
                if model.xl:
                    time_ids = torch.tensor(
                        [[*image.original_size, *image.crop_top_left, height, width] for image in batch],
                        device=device,
                        dtype=hidden.dtype,
                    )
                    extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
                prediction_out = model.unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), **extra).sample
            target = scheduler.get_velocity(latents, noise, timesteps) if prediction == "v_prediction" else noise
            loss = torch.nn.functional.mse_loss(prediction_out.float(), target.float(), reduction="none")
            loss = loss.mean(dim=[1, 2, 3])
            if config.min_snr_gamma:
                snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
                weight = torch.clamp(snr, max=config.min_snr_gamma) / snr
                if prediction == "v_prediction":
                    weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)
                loss = loss * weight
            loss = loss.mean()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}: lower the learning rate or use bf16/no "
                    "mixed precision"
                )
            epoch_losses.append(loss.item())
            scaled = loss / config.gradient_accumulation_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
            if number % config.gradient_accumulation_steps and number != len(batches):
                continue
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = sum(epoch_losses) / len(epoch_losses)
            if on_progress is not None:
                on_progress({"epoch": epoch, "epochs": epochs, "step": step, "steps": total_steps, "loss": loss_value})
            if step >= total_steps:
                break
        last = epoch == epochs or step >= total_steps
        if last:
            break
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            path = output_dir / config.epoch_file(epoch)
            _save(path, _kohya_state_dict(model, config, _save_dtype(config)), _finish(metadata, epoch, step))
            written.append(path)
            epoch_files.append(path)
            if config.save_last_n_epochs is not None:
                while len(epoch_files) > config.save_last_n_epochs:
                    old = epoch_files.pop(0)
                    old.unlink(missing_ok=True)
                    written.remove(old)
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
    final = output_dir / config.final_file()
    _save(final, _kohya_state_dict(model, config, _save_dtype(config)), _finish(metadata, epochs, step))
    written.append(final)
    return TrainResult(
        files=written,
        warnings=warnings,
        loss=loss_value,
        seconds=time.time() - started_at,
        steps=step,
        epochs=epochs,
        family=model.family,
        seed=seed,
    )


def _save_dtype(config: TrainingConfig) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.save_precision, torch.float32)


def _metadata(
    config: TrainingConfig,
    model: _Model,
    images: list[TrainImage],
    seed: int,
    epochs: int,
    steps: int,
    batches_per_epoch: int,
    optimizer_name: str,
    started_at: float,
) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata (strings, as safetensors requires), plus a few ``modelspec.*`` keys."""
    width, height = config.resolution
    dirs: dict[str, dict[str, int]] = {}
    for image in images:
        entry = dirs.setdefault(image.folder, {"n_repeats": image.repeats, "img_count": 0})
        entry["img_count"] += 1
    version = _base_model_version(model)
    architecture = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-768-v"}.get(
        version, "stable-diffusion-xl-v1-base"
    )
    meta: dict[str, Any] = {
        "ss_session_id": random.randrange(2**31),
        "ss_training_started_at": started_at,
        "ss_output_name": config.output_name,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_num_train_images": sum(image.repeats for image in images),
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": epochs,
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": steps,
        "ss_lr_warmup_steps": int(config.lr_warmup_steps) if config.lr_warmup_steps >= 1 else config.lr_warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.network_dim,
        "ss_network_alpha": config.network_alpha,
        "ss_network_dropout": None,
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": model.family == "sd2",
        "ss_base_model_version": version,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": config.cache_latents,
        "ss_seed": seed,
        "ss_lowram": False,
        "ss_noise_offset": config.noise_offset or None,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_training_comment": config.training_comment,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_caption_dropout_rate": 0.0,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": 0.0,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_loss_type": "l2",
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": False,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": False,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_tag_frequency": json.dumps(_tag_frequency(images, config.caption_separator)),
        "ss_dataset_dirs": json.dumps(dirs),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model.xl else "diffusers",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{width}x{height}",
    }
    return {key: str(value) for key, value in meta.items()}


def _base_model_version(model: _Model) -> str:
    """kohya's ``ss_base_model_version``, which A1111 and ComfyUI read to tell SD 1.x, 2.x and SDXL LoRAs apart."""
    if model.xl:
        return "sdxl_base_v1-0"
    return "sd_v2" if model.family == "sd2" else "sd_v1"


def _finish(metadata: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    """The metadata of one saved file: which epoch/step it holds and when it was written."""
    finished = time.time()
    return {
        **metadata,
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_training_finished_at": str(finished),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished)),
    }
