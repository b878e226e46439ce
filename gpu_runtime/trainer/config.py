"""The kohya ``train_network.py`` config: which keys this trainer honours, ignores or refuses, how values are read
(numbers as strings, GUI empty strings as unset) and :class:`TrainingConfig` with kohya's defaults and file names."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_runtime.trainer.buckets import INTERPOLATIONS
from gpu_runtime.trainer.errors import TrainingError

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
MAX_TOKENS = 75  # one CLIP window without BOS/EOS

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
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
        "resize_interpolation",
        "flip_aug",
        "color_aug",
        "random_crop",
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


def _buckets(c: TrainingConfig, raw: Mapping[str, Any], warnings: list[str]) -> None:
    """kohya's bucket options (``DreamBoothDataset.__init__``, ``adjust_min_max_bucket_reso_by_steps``): min/max
    are moved to multiples of ``bucket_reso_steps`` (with a warning) and must enclose the resolution."""
    c.enable_bucket = _flag(raw, "enable_bucket")
    interpolation = _text(raw, "resize_interpolation", None)
    if interpolation is not None and interpolation.lower() not in INTERPOLATIONS:
        raise TrainingError(f"resize_interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    c.resize_interpolation = interpolation.lower() if interpolation is not None else None
    keys = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale")
    if not c.enable_bucket:
        unused = [k for k in keys if _truthy(raw.get(k))]
        if unused:
            warnings.append(f"{', '.join(unused)}: no effect without enable_bucket (as in kohya)")
        return
    steps = _number(raw, "bucket_reso_steps", 64, int, 1)
    low = _number(raw, "min_bucket_reso", 256, int, 1)
    high = _number(raw, "max_bucket_reso", 1024, int, 1)
    if low % steps:
        warnings.append(f"min_bucket_reso {low} is lowered to {low - low % steps}, a multiple of bucket_reso_steps")
        low -= low % steps
    if high % steps:
        warnings.append(
            f"max_bucket_reso {high} is raised to {high + steps - high % steps}, a multiple of bucket_reso_steps"
        )
        high += steps - high % steps
    if low == 0:
        raise TrainingError(f"min_bucket_reso must be at least bucket_reso_steps ({steps})")
    if min(c.resolution) < low:
        raise TrainingError(f"min_bucket_reso {low} must not be larger than the resolution {c.resolution}")
    if max(c.resolution) > high:
        raise TrainingError(f"max_bucket_reso {high} must not be smaller than the resolution {c.resolution}")
    c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps = low, high, steps
    c.bucket_no_upscale = _flag(raw, "bucket_no_upscale")
    if c.bucket_no_upscale and any(not _unset(raw.get(k)) for k in ("min_bucket_reso", "max_bucket_reso")):
        warnings.append(
            "bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored, buckets follow the image sizes "
            "(as in kohya)"
        )


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
    # kohya's dataset values: None (and no_upscale False) without enable_bucket, as ss_* metadata records them
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    bucket_no_upscale: bool = False
    resize_interpolation: str | None = None
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
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
        _buckets(c, raw, warnings)
        c.flip_aug = _flag(raw, "flip_aug")
        c.color_aug = _flag(raw, "color_aug")
        c.random_crop = _flag(raw, "random_crop")
        if c.cache_latents and (c.color_aug or c.random_crop):
            on = " and ".join(k for k in ("color_aug", "random_crop") if getattr(c, k))
            raise TrainingError(
                f"cache_latents cannot be used with {on}: cached latents cannot change per step (kohya refuses "
                "this too); turn cache_latents off or drop the augmentation"
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
