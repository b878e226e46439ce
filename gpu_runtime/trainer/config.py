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
from gpu_runtime.trainer.samples import check_sampler

# kohya's lr_scheduler choices: transformers' schedule functions as get_scheduler_fix calls them, diffusers'
# piecewise_constant and Adafactor's own schedule (transformers' others fail in kohya on their arguments).
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)
MAX_TOKEN_LENGTHS = (75, 150, 225)  # kohya's choices (75 is its default, one CLIP window without BOS/EOS)
LOSS_TYPES = ("l1", "l2", "huber", "smooth_l1")  # kohya's --loss_type choices
HUBER_SCHEDULES = ("constant", "exponential", "snr")  # kohya's --huber_schedule choices
NUM_TRAIN_TIMESTEPS = 1000  # kohya's DDPM schedule; --max_timestep is 1..1000

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
    "cpu_offload_checkpointing": "no effect on this runtime",
    "torch_compile": "no effect on this runtime",
    "dynamo_backend": "no effect on this runtime",
    "log_config": "no effect on this runtime",
    "skip_cache_check": "no effect on this runtime",
    "fused_backward_pass": "no effect on this runtime",
    "blocks_to_swap": "no effect on this runtime",
    "disable_mmap_load_safetensors": "no effect on this runtime",
    "validation_seed": "no validation split is made",
    "validate_every_n_steps": "no validation split is made",
    "validate_every_n_epochs": "no validation split is made",
    "max_validation_steps": "no validation split is made",
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
# Features this trainer does not implement: switched on, they fail the job at start, named (never a warning).
_UNSUPPORTED = {
    "debug_dataset": "kohya only shows the dataset and does not train",
    "validation_split": "a validation split is not supported",
    "initial_epoch": "starting at a later epoch is not supported (use resume)",
    "initial_step": "starting at a later step is not supported (use resume)",
    "metadata_title": "custom modelspec metadata is not supported",
    "metadata_author": "custom modelspec metadata is not supported",
    "metadata_description": "custom modelspec metadata is not supported",
    "metadata_license": "custom modelspec metadata is not supported",
    "metadata_tags": "custom modelspec metadata is not supported",
    "face_crop_aug_range": "image augmentation is not supported",
    "token_warmup_min": "token warm-up is not supported",
    "token_warmup_step": "token warm-up is not supported",
    "in_json": "fine-tuning metadata datasets are not supported: use <repeats>_<name> folders",
    "dataset_config": "dataset config files are not supported: use <repeats>_<name> folders",
    "dataset_repeats": "repeats come from the folder names",
    "masked_loss": "masked loss is not supported",
    "alpha_mask": "masked loss is not supported",
    "fp8_base": "fp8 base weights are not supported",
    "fp8_base_unet": "fp8 base weights are not supported",
    "vae": "a separate VAE is not supported: the checkpoint's VAE is used",
    "no_metadata": "ss_* metadata is always written",
    "training_comment_file": "not supported",
}
# Keys that shape no training step: a resumed run may differ from its saved state in these. Where reg_data_dir lies
# does not matter either: its images are part of the dataset digest that a resume compares.
RESUME_IGNORED = frozenset({*_RUNTIME_OWNED, *_NO_EFFECT, "reg_data_dir"})
# Keys this trainer reads (honoured, or approximated with their own warning).
_HONOURED = frozenset(
    {
        "output_name",
        "max_train_epochs",
        "max_train_steps",
        "save_every_n_epochs",
        "save_last_n_epochs",
        "save_state",
        "save_state_on_train_end",
        "save_last_n_epochs_state",
        "save_every_n_steps",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "save_n_epoch_ratio",
        "resume",
        "save_model_as",
        "save_precision",
        "network_module",
        "network_dim",
        "network_alpha",
        "network_args",
        "network_dropout",
        "rank_dropout",  # kohya reads it from network_args; accepted at the top level too (GUI configs)
        "module_dropout",
        "network_weights",
        "dim_from_weights",
        "base_weights",
        "base_weights_multiplier",
        "scale_weight_norms",
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
        "keep_tokens_separator",
        "secondary_separator",
        "enable_wildcard",
        "caption_dropout_rate",
        "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate",
        "weighted_captions",
        "max_token_length",
        "mixed_precision",
        "full_fp16",
        "full_bf16",
        "no_half_vae",  # the VAE always runs in float32 here, which is what no_half_vae asks for
        "optimizer_type",
        "optimizer_args",
        "use_8bit_adam",
        "use_lion_optimizer",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_scheduler_num_cycles",
        "lr_scheduler_power",
        "lr_scheduler_type",
        "lr_scheduler_args",
        "lr_decay_steps",
        "lr_scheduler_min_lr_ratio",
        "lr_scheduler_timescale",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "max_grad_norm",
        "clip_skip",
        "noise_offset",
        "noise_offset_random_strength",
        "adaptive_noise_scale",
        "multires_noise_iterations",
        "multires_noise_discount",
        "ip_noise_gamma",
        "ip_noise_gamma_random_strength",
        "zero_terminal_snr",
        "min_snr_gamma",
        "debiased_estimation_loss",
        "scale_v_pred_loss_like_noise_pred",
        "v_pred_like_loss",
        "min_timestep",
        "max_timestep",
        "loss_type",
        "huber_c",
        "huber_schedule",
        "huber_scale",
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
        "reg_data_dir",
        "training_comment",
        "sample_every_n_epochs",
        "sample_every_n_steps",
        "sample_at_first",
        "sample_prompts",
        "sample_sampler",
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


# kohya's defaults of the refused options that are not false/zero/empty: at its default an option asks for nothing.
_KOHYA_DEFAULTS = {"token_warmup_min": 1, "sample_sampler": "ddim", "dataset_repeats": 1, "dynamo_backend": "inductor"}


def _switched_on(key: str, value: Any) -> bool:
    """Whether an option asks for something: set, and not kohya's default."""
    default = _KOHYA_DEFAULTS.get(key)
    if default is not None and str(value).strip().lower() == str(default):
        return False
    return _truthy(value)


def _truthy(value: Any) -> bool:
    """Whether an option is switched on (most of kohya's defaults are false/zero/empty)."""
    if _unset(value):
        return False
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "0.0", "no", "[]")
    return bool(value)


def _noise_and_loss(raw: Mapping[str, Any], c: TrainingConfig, warnings: list[str]) -> None:
    """The noise, timestep and loss options with kohya's defaults and kohya's checks (``verify_training_args``,
    argparse's choices); a modifier whose base option is off has no effect in kohya either, which is reported."""
    c.noise_offset = _number(raw, "noise_offset", 0.0, float, 0)
    c.noise_offset_random_strength = _flag(raw, "noise_offset_random_strength")
    c.adaptive_noise_scale = _number(raw, "adaptive_noise_scale", None, float) or None  # 0 adds nothing
    if c.adaptive_noise_scale is not None and not c.noise_offset:
        raise TrainingError("adaptive_noise_scale requires noise_offset")
    c.multires_noise_iterations = _number(raw, "multires_noise_iterations", None, int, 0) or None
    c.multires_noise_discount = _number(raw, "multires_noise_discount", 0.3, float, 0)
    c.ip_noise_gamma = _number(raw, "ip_noise_gamma", None, float, 0) or None
    c.ip_noise_gamma_random_strength = _flag(raw, "ip_noise_gamma_random_strength")
    c.zero_terminal_snr = _flag(raw, "zero_terminal_snr")

    c.min_snr_gamma = _number(raw, "min_snr_gamma", None, float, 0) or None
    c.debiased_estimation_loss = _flag(raw, "debiased_estimation_loss")
    c.scale_v_pred_loss_like_noise_pred = _flag(raw, "scale_v_pred_loss_like_noise_pred")
    c.v_pred_like_loss = _number(raw, "v_pred_like_loss", None, float, 0) or None
    if c.v_parameterization is not None:  # else the checkpoint decides: checked again once it is loaded
        check_prediction(c, v_prediction=c.v_parameterization)

    c.min_timestep = _number(raw, "min_timestep", 0, int, 0)
    c.max_timestep = _number(raw, "max_timestep", None, int, 1)
    timestep_range(c, NUM_TRAIN_TIMESTEPS)

    c.loss_type = (_text(raw, "loss_type", "l2") or "l2").lower()
    if c.loss_type not in LOSS_TYPES:
        raise TrainingError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {c.loss_type!r}")
    c.huber_schedule = (_text(raw, "huber_schedule", "snr") or "snr").lower()
    if c.huber_schedule not in HUBER_SCHEDULES:
        raise TrainingError(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, got {c.huber_schedule!r}")
    c.huber_c = _number(raw, "huber_c", 0.1, float, 0)
    c.huber_scale = _number(raw, "huber_scale", 1.0, float, 0)
    huber = c.loss_type in ("huber", "smooth_l1")
    if huber and c.huber_schedule == "exponential" and c.huber_c <= 0:
        raise TrainingError("huber_c must be above 0 with huber_schedule exponential (it is the log of the decay)")

    # (key, parsed value, kohya's default, whether it is used, why not): set but unused has no effect, as in kohya
    modifiers: list[tuple[str, Any, Any, bool, str]] = [
        ("noise_offset_random_strength", c.noise_offset_random_strength, False, bool(c.noise_offset), "noise_offset"),
        ("multires_noise_discount", c.multires_noise_discount, 0.3, bool(c.multires_noise_iterations),
         "multires_noise_iterations"),
        ("ip_noise_gamma_random_strength", c.ip_noise_gamma_random_strength, False, bool(c.ip_noise_gamma),
         "ip_noise_gamma"),
        ("huber_c", c.huber_c, 0.1, huber, "loss_type huber or smooth_l1"),
        ("huber_schedule", c.huber_schedule, "snr", huber, "loss_type huber or smooth_l1"),
        ("huber_scale", c.huber_scale, 1.0, huber and c.huber_schedule != "snr",
         "loss_type huber or smooth_l1 and huber_schedule constant or exponential"),
    ]  # fmt: skip
    for key, value, default, used, needs in modifiers:
        if not used and not _unset(raw.get(key)) and value != default:
            warnings.append(f"{key} has no effect without {needs} (as in kohya)")


def timestep_range(c: TrainingConfig, num_train_timesteps: int) -> tuple[int, int]:
    """kohya's ``min_timestep``/``max_timestep`` for a schedule of ``num_train_timesteps``: timesteps are drawn from
    [min, max) (max defaults to the schedule's length), or are all ``max`` when min = max. What kohya would crash on
    (a timestep past the schedule) or silently replace (min above max) is an error naming the option."""
    maximum = num_train_timesteps if c.max_timestep is None else c.max_timestep
    if maximum > num_train_timesteps:
        raise TrainingError(f"max_timestep must be at most {num_train_timesteps}, got {maximum}")
    if c.min_timestep > maximum:
        raise TrainingError(f"min_timestep ({c.min_timestep}) must not be larger than max_timestep ({maximum})")
    if c.min_timestep == maximum == num_train_timesteps:
        raise TrainingError(f"min_timestep = max_timestep = {maximum} is past the last timestep ({maximum - 1})")
    return c.min_timestep, maximum


def check_prediction(c: TrainingConfig, v_prediction: bool) -> None:
    """kohya's v-parameterization checks, once the prediction type is known (the config's ``v_parameterization``,
    or the checkpoint's scheduler when the config leaves it unset)."""
    if c.scale_v_pred_loss_like_noise_pred and not v_prediction:
        raise TrainingError("scale_v_pred_loss_like_noise_pred can be enabled only with v_parameterization")
    if c.v_pred_like_loss and v_prediction:
        raise TrainingError("v_pred_like_loss cannot be enabled with v_parameterization")


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


def _keyword_args(raw: Mapping[str, Any], key: str) -> dict[str, Any]:
    """kohya's ``optimizer_args`` / ``lr_scheduler_args``: ``key=value`` strings whose values are Python literals
    (``ast.literal_eval``, as kohya; ``decouple=true`` is an error there and here, not a truthy string)."""
    import ast

    value = raw.get(key)
    if _unset(value):
        return {}
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise TrainingError(f"{key} must be a list of key=value strings, got {value!r}")
    kwargs: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise TrainingError(f"{key} entries must look like key=value, got {item!r}")
        name, text = (part.strip() for part in item.split("=", 1))
        try:
            kwargs[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise TrainingError(
                f"{key}: the value of {name} must be a Python literal (True, 0.01, (0.9, 0.99), 'text'), got {text!r}"
            ) from None
    return kwargs


def _steps_or_ratio(raw: Mapping[str, Any], key: str) -> int | float:
    """kohya's ``int_or_float``: a whole number of steps, a ratio of the training steps below 1, or ``"10%"``."""
    value = raw.get(key)
    if isinstance(value, str) and value.strip().endswith("%"):
        percent = _number({key: value.strip()[:-1]}, key, 0.0, float, 0)
        if percent >= 100:
            raise TrainingError(f"{key} {value!r} must be below 100%")
        return percent / 100
    number = _number(raw, key, 0, float, 0)
    if number < 1:
        return number
    if number != int(number):
        raise TrainingError(f"{key} must be a whole number of steps or a ratio below 1, got {value!r}")
    return int(number)


# The network_args keys kohya's networks/lora.py reads (create_network), by what this trainer does with them.
_NETWORK_ARGS_HONOURED = (
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
)
_NETWORK_ARGS_REFUSED = {
    "block_dims": "per-block LoRA dims are not supported",
    "block_alphas": "per-block LoRA dims are not supported",
    "conv_block_dims": "per-block LoRA dims are not supported",
    "conv_block_alphas": "per-block LoRA dims are not supported",
    "down_lr_weight": "per-block learning rates are not supported",
    "mid_lr_weight": "per-block learning rates are not supported",
    "up_lr_weight": "per-block learning rates are not supported",
    "block_lr_zero_threshold": "per-block learning rates are not supported",
}


def _network_args(value: Any, warnings: list[str]) -> dict[str, str]:
    """kohya's ``network_args``: ``key=value`` strings (a TOML list; a whitespace-separated string is accepted too),
    kept as strings as kohya passes them to ``create_network``. A key networks.lora reads but this trainer does not
    implement is a :class:`TrainingError`; a key it never reads is ignored with a warning, as kohya ignores it."""
    if _unset(value):
        return {}
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise TrainingError(f"network_args must be a list of key=value strings, got {value!r}")
    args: dict[str, str] = {}
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise TrainingError(f"network_args entries must look like key=value, got {item!r}")
        key, text = (part.strip().strip("\"'") for part in item.split("=", 1))
        args[key] = text
    for key in args:
        if key in _NETWORK_ARGS_REFUSED:
            raise TrainingError(f"network_args {key} is not supported: {_NETWORK_ARGS_REFUSED[key]}")
        if key == "dropout":
            warnings.append("network_args dropout has no effect with networks.lora (kohya reads network_dropout)")
        elif key not in _NETWORK_ARGS_HONOURED:
            warnings.append(f"network_args {key} is ignored: networks.lora does not read it")
    return args


def _dropout(value: Any, key: str, below_one: bool = False) -> float | None:
    """A dropout probability; 0 and unset both mean none (kohya: "0 or None is default behavior")."""
    p = _number({key: value}, key, None, float, 0)
    if p is not None and (p > 1 or (below_one and p >= 1)):
        raise TrainingError(f"{key} must be {'below' if below_one else 'at most'} 1, got {value!r}")
    return p or None


def _paths(value: Any, key: str) -> list[Path]:
    """kohya's ``nargs="*"`` path options: a list of paths (one string is one path)."""
    if _unset(value):
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) and item.strip() for item in items):
        raise TrainingError(f"{key} must be a path or a list of paths, got {value!r}")
    return [Path(item.strip()) for item in items]


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
    step_name: str = "at"  # kohya's DEFAULT_STEP_NAME: the step files' and step states' name without output_name
    max_train_epochs: int | None = None
    max_train_steps: int = 1600
    save_every_n_epochs: int | None = None
    save_last_n_epochs: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    save_last_n_epochs_state: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_steps: int | None = None  # in steps, not files (kohya's get_remove_step_no)
    save_last_n_steps_state: int | None = None
    save_n_epoch_ratio: int | None = None  # replaces save_every_n_epochs once the epochs are known (epoch_interval)
    resume: Path | None = None
    save_precision: str = "float"
    network_dim: int = 4
    network_alpha: float = 1.0
    network_dropout: float | None = None
    network_args: dict[str, str] = field(default_factory=dict)
    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    network_weights: Path | None = None
    dim_from_weights: bool = False
    base_weights: list[Path] = field(default_factory=list)
    base_weights_multiplier: list[float] = field(default_factory=list)
    scale_weight_norms: float | None = None
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
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    weighted_captions: bool = False
    max_token_length: int | None = None
    mixed_precision: str = "no"
    full_fp16: bool = False
    full_bf16: bool = False
    optimizer_type: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float = 0
    lr_decay_steps: int | float = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_args: dict[str, Any] = field(default_factory=dict)
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    clip_skip: int | None = None
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    min_timestep: int = 0
    max_timestep: int | None = None  # kohya: the schedule's num_train_timesteps
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
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
    reg_data_dir: Path | None = None  # kohya's regularization images (<repeats>_<class>/ folders)
    training_comment: str | None = None
    sample_every_n_epochs: int | None = None
    sample_every_n_steps: int | None = None
    sample_at_first: bool = False
    sample_prompts: Path | None = None
    sample_sampler: str = "ddim"
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
        config = cls.from_dict(data)
        config._resolve_paths(Path(path).parent)
        return config

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
            c.output_name = c.epoch_name = c.step_name = _file_name(name, "output_name")
        epochs = _number(raw, "max_train_epochs", None, int, 1)
        c.max_train_epochs = epochs
        c.max_train_steps = _number(raw, "max_train_steps", 1600, int, 1)
        c.save_every_n_epochs = _number(raw, "save_every_n_epochs", None, int, 1)
        c.save_last_n_epochs = _number(raw, "save_last_n_epochs", None, int, 1)
        c.save_state = _flag(raw, "save_state")
        c.save_state_on_train_end = _flag(raw, "save_state_on_train_end")
        c.save_last_n_epochs_state = _number(raw, "save_last_n_epochs_state", None, int, 1)
        if c.save_last_n_epochs_state is not None and not c.save_state:
            warnings.append("save_last_n_epochs_state has no effect without save_state")
        _step_saves(raw, c, warnings)
        resume = _paths(raw.get("resume"), "resume")
        if len(resume) > 1:
            raise TrainingError("resume must be one state file")
        c.resume = resume[0] if resume else None
        precision = (_text(raw, "save_precision", "float") or "float").lower()
        if precision in ("fp32", "float32", "no"):
            precision = "float"
        if precision not in ("float", "fp16", "bf16"):
            raise TrainingError(f"save_precision must be float, fp16 or bf16, got {precision!r}")
        c.save_precision = precision

        c.network_dim = _number(raw, "network_dim", 4, int, 1)
        c.network_alpha = _number(raw, "network_alpha", 1.0, float, 0) or float(c.network_dim)  # kohya: 0 = dim
        c._parse_network(raw, warnings)
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
        c.keep_tokens_separator = _text(raw, "keep_tokens_separator", "") or ""
        c.secondary_separator = _text(raw, "secondary_separator", None) or None
        c.enable_wildcard = _flag(raw, "enable_wildcard")
        c.caption_dropout_rate = _number(raw, "caption_dropout_rate", 0.0, float, 0)
        c.caption_dropout_every_n_epochs = _number(raw, "caption_dropout_every_n_epochs", 0, int, 0)
        c.caption_tag_dropout_rate = _number(raw, "caption_tag_dropout_rate", 0.0, float, 0)
        c.weighted_captions = _flag(raw, "weighted_captions")
        c.max_token_length = _number(raw, "max_token_length", None, int, 1)
        if c.max_token_length is not None and c.max_token_length not in MAX_TOKEN_LENGTHS:
            raise TrainingError(f"max_token_length must be 75, 150 or 225 (kohya's choices), got {c.max_token_length}")

        mixed = (_text(raw, "mixed_precision", "no") or "no").lower()
        if mixed not in ("no", "fp16", "bf16"):
            raise TrainingError(f"mixed_precision must be no, fp16 or bf16, got {mixed!r}")
        c.mixed_precision = mixed
        c.full_fp16, c.full_bf16 = _flag(raw, "full_fp16"), _flag(raw, "full_bf16")
        if c.full_fp16 and c.full_bf16:
            raise TrainingError("full_fp16 and full_bf16 cannot both be true")
        for full, needed in ((c.full_fp16, "fp16"), (c.full_bf16, "bf16")):
            if full and mixed != needed:
                raise TrainingError(f"full_{needed} requires mixed_precision = {needed!r}, got {mixed!r}")

        _parse_optimizer(raw, c)

        c.gradient_accumulation_steps = _number(raw, "gradient_accumulation_steps", 1, int, 1)
        c.gradient_checkpointing = _flag(raw, "gradient_checkpointing")
        c.max_grad_norm = _number(raw, "max_grad_norm", 1.0, float, 0)
        c.clip_skip = _number(raw, "clip_skip", None, int, 1)
        c.v2 = _flag(raw, "v2")
        c.v_parameterization = _flag(raw, "v_parameterization") if not _unset(raw.get("v_parameterization")) else None
        _noise_and_loss(raw, c, warnings)
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
        reg = _text(raw, "reg_data_dir", None)
        c.reg_data_dir = Path(reg.strip()) if reg and reg.strip() else None
        c.training_comment = _text(raw, "training_comment", None)
        _samples(c, raw, warnings)

        owned = sorted(k for k in raw if k in _RUNTIME_OWNED and not _unset(raw[k]))
        if owned:
            warnings.append(f"ignored, the runtime decides these: {', '.join(owned)}")
        refused = []
        for key in sorted(raw):
            if key in _NO_EFFECT and _switched_on(key, raw[key]):
                warnings.append(f"{key} is ignored: {_NO_EFFECT[key]}")
            elif key in _UNSUPPORTED and _switched_on(key, raw[key]):
                refused.append(f"{key} ({_UNSUPPORTED[key]})")
        unknown = sorted(k for k in raw if k not in _HONOURED and k not in _RUNTIME_OWNED)
        unknown = [k for k in unknown if k not in _NO_EFFECT and k not in _UNSUPPORTED and not _unset(raw[k])]
        if unknown:
            refused.append(f"{', '.join(unknown)} (not kohya train_network options)")
        if refused:
            # No silent drops: a run that ignored any of these would not be the training that was asked for.
            raise TrainingError(f"options this trainer does not implement: {'; '.join(refused)}")
        return c

    def _parse_network(self, raw: Mapping[str, Any], warnings: list[str]) -> None:
        """kohya's network options: ``network_args`` (conv_dim/conv_alpha, rank/module dropout, LoRA+ ratios),
        ``network_dropout``, ``network_weights``/``dim_from_weights``, ``base_weights`` and
        ``scale_weight_norms``, with kohya's defaults (``conv_alpha`` 1 when only ``conv_dim`` is given)."""
        args = _network_args(raw.get("network_args"), warnings)
        self.network_args = args
        self.network_dropout = _dropout(raw.get("network_dropout"), "network_dropout")
        if "conv_dim" in args:
            self.conv_dim = _number(args, "conv_dim", None, int, 0)
        if self.conv_dim is not None:
            self.conv_alpha = _number(args, "conv_alpha", 1.0, float, 0)
        elif not _unset(args.get("conv_alpha")):
            warnings.append("network_args conv_alpha has no effect without conv_dim")
        for key in ("rank_dropout", "module_dropout"):
            below_one = key == "rank_dropout"  # kohya rescales by 1 / (1 - p)
            inner, outer = _dropout(args.get(key), key, below_one), _dropout(raw.get(key), key, below_one)
            if inner is not None and outer is not None and inner != outer:
                raise TrainingError(f"{key} is set both in network_args ({inner}) and at the top level ({outer})")
            setattr(self, key, inner if inner is not None else outer)
        ratio = _number(args, "loraplus_lr_ratio", None, float, 0)
        self.loraplus_unet_lr_ratio = _number(args, "loraplus_unet_lr_ratio", None, float, 0) or ratio
        self.loraplus_text_encoder_lr_ratio = _number(args, "loraplus_text_encoder_lr_ratio", None, float, 0) or ratio

        weights = _paths(raw.get("network_weights"), "network_weights")
        if len(weights) > 1:
            raise TrainingError("network_weights must be one file")
        self.network_weights = weights[0] if weights else None
        self.dim_from_weights = _flag(raw, "dim_from_weights")
        if self.dim_from_weights:
            if self.network_weights is None:
                raise TrainingError("dim_from_weights needs network_weights (the file to read the dims from)")
            names = ("network_dropout", "rank_dropout", "module_dropout", "conv_dim")
            ignored = [k for k in names if getattr(self, k)]
            if self.loraplus_unet_lr_ratio or self.loraplus_text_encoder_lr_ratio:
                ignored.append("loraplus ratios")  # create_network_from_weights never sets them
                self.loraplus_unet_lr_ratio = self.loraplus_text_encoder_lr_ratio = None
            if ignored:
                warnings.append(
                    f"{', '.join(ignored)}: no effect with dim_from_weights (kohya builds the network from the "
                    "file's modules, without dropout or LoRA+)"
                )
        self.base_weights = _paths(raw.get("base_weights"), "base_weights")
        multipliers = raw.get("base_weights_multiplier")
        if _unset(multipliers):
            multipliers = []
        elif not isinstance(multipliers, list | tuple):
            multipliers = [multipliers]
        self.base_weights_multiplier = [
            _number({"base_weights_multiplier": m}, "base_weights_multiplier", 1.0, float) for m in multipliers
        ]
        if self.base_weights_multiplier and not self.base_weights:
            warnings.append("base_weights_multiplier has no effect without base_weights")
        self.scale_weight_norms = _number(raw, "scale_weight_norms", None, float, 0) or None

    def _resolve_paths(self, folder: Path) -> None:
        """``network_weights``, ``base_weights``, ``sample_prompts`` and the ``reg_data_dir`` folder relative to the
        config file's folder; a missing file fails the job before the model is loaded (a missing ``reg_data_dir``
        when the dataset is read, also before)."""

        def resolve(path: Path, key: str) -> Path:
            path = path if path.is_absolute() else folder / path
            if not path.is_file():
                raise TrainingError(f"{key} file {path} does not exist")
            return path

        if self.network_weights is not None:
            self.network_weights = resolve(self.network_weights, "network_weights")
        if self.resume is not None and not self.resume.is_absolute():  # a missing state fails in load_state
            self.resume = folder / self.resume
        self.base_weights = [resolve(path, "base_weights") for path in self.base_weights]
        if self.sample_prompts is not None:
            self.sample_prompts = resolve(self.sample_prompts, "sample_prompts")
        if self.reg_data_dir is not None and not self.reg_data_dir.is_absolute():
            self.reg_data_dir = folder / self.reg_data_dir

    def epoch_file(self, epoch: int) -> str:
        """kohya's per-epoch file name (``{output_name}-{epoch:06d}.safetensors``)."""
        return f"{self.epoch_name}-{epoch:06d}.safetensors"

    def epoch_state_file(self, epoch: int) -> str:
        """kohya's per-epoch state name (``{output_name}-{epoch:06d}-state``) as one file."""
        return f"{self.epoch_name}-{epoch:06d}-state.pt"

    def step_file(self, step: int) -> str:
        """kohya's per-step file name (``get_step_ckpt_name``: ``{output_name}-step{step:08d}.safetensors``)."""
        return f"{self.step_name}-step{step:08d}.safetensors"

    def step_state_file(self, step: int) -> str:
        """kohya's per-step state name (``{output_name}-step{step:08d}-state``) as one file."""
        return f"{self.step_name}-step{step:08d}-state.pt"

    def epoch_interval(self, epochs: int) -> int | None:
        """Every how many epochs a file is saved in a run of ``epochs`` epochs: ``save_every_n_epochs``, or with
        ``save_n_epoch_ratio`` kohya's ``floor(epochs / ratio) or 1`` (it overrides save_every_n_epochs)."""
        if self.save_n_epoch_ratio:
            return epochs // self.save_n_epoch_ratio or 1
        return self.save_every_n_epochs

    def removed_step(self, step: int, keep: int | None) -> int | None:
        """The earlier step save that the save at ``step`` rotates out (kohya's ``get_remove_step_no``): ``keep``
        (``save_last_n_steps``) counts steps, not files: the save ``keep + 1`` steps back, rounded down to a
        multiple of ``save_every_n_steps``, goes. None when nothing is (step 0 was never saved)."""
        if keep is None or not self.save_every_n_steps:
            return None
        removed = step - keep - 1
        removed -= removed % self.save_every_n_steps
        return removed if removed > 0 else None

    def final_state_file(self) -> str:
        """kohya's end-of-training state name (``{output_name}-state``) as one file."""
        return f"{self.output_name}-state.pt"

    def final_file(self) -> str:
        """kohya's final file name (``{output_name}.safetensors``)."""
        return f"{self.output_name}.safetensors"


def _samples(c: TrainingConfig, raw: Mapping[str, Any], warnings: list[str]) -> None:
    """kohya's sample-image options (``train_util.sample_images_common``): the triggers, the prompt file and the
    default sampler, which must be one of kohya's choices that the runtime's samplers provide."""
    c.sample_every_n_epochs = _number(raw, "sample_every_n_epochs", None, int, 0) or None
    c.sample_every_n_steps = _number(raw, "sample_every_n_steps", None, int, 0) or None
    c.sample_at_first = _flag(raw, "sample_at_first")
    prompts = _text(raw, "sample_prompts", None)
    c.sample_prompts = Path(prompts) if prompts else None
    c.sample_sampler = check_sampler(_text(raw, "sample_sampler", "ddim") or "ddim", "sample_sampler")
    triggers = [k for k in ("sample_every_n_epochs", "sample_every_n_steps", "sample_at_first") if getattr(c, k)]
    if triggers and c.sample_prompts is None:
        raise TrainingError(f"{', '.join(triggers)} needs sample_prompts (the prompt file of the sample images)")
    if c.sample_every_n_epochs and c.sample_every_n_steps:
        warnings.append("sample_every_n_steps is ignored: sample_every_n_epochs is set (as in kohya)")


def _parse_optimizer(raw: Mapping[str, Any], c: TrainingConfig) -> None:
    """kohya's optimizer and schedule options, with the combinations kohya refuses refused here, at the start."""
    c.optimizer_type = _text(raw, "optimizer_type", "") or ""
    eight_bit, lion = _flag(raw, "use_8bit_adam"), _flag(raw, "use_lion_optimizer")
    if eight_bit and lion:
        raise TrainingError("use_8bit_adam and use_lion_optimizer cannot both be true")
    if (eight_bit or lion) and c.optimizer_type:
        legacy = "use_8bit_adam" if eight_bit else "use_lion_optimizer"
        raise TrainingError(f"{legacy} and optimizer_type {c.optimizer_type!r} cannot both be set")
    c.optimizer_type = c.optimizer_type or ("AdamW8bit" if eight_bit else "Lion" if lion else "AdamW")
    c.optimizer_args = _keyword_args(raw, "optimizer_args")

    scheduler = (_text(raw, "lr_scheduler", "constant") or "constant").lower()
    if scheduler.startswith("adafactor:"):  # kohya's internal spelling of the adafactor schedule
        scheduler = "adafactor"
    if scheduler not in SCHEDULERS:
        raise TrainingError(f"lr_scheduler {scheduler!r} is not supported; kohya's choices: {', '.join(SCHEDULERS)}")
    c.lr_scheduler = scheduler
    c.lr_scheduler_type = _text(raw, "lr_scheduler_type", "") or ""
    c.lr_scheduler_args = _keyword_args(raw, "lr_scheduler_args")
    c.lr_warmup_steps = _steps_or_ratio(raw, "lr_warmup_steps")
    c.lr_decay_steps = _steps_or_ratio(raw, "lr_decay_steps")
    c.lr_scheduler_num_cycles = _number(raw, "lr_scheduler_num_cycles", 1, int, 1)
    c.lr_scheduler_power = _number(raw, "lr_scheduler_power", 1.0, float, 0)
    c.lr_scheduler_timescale = _number(raw, "lr_scheduler_timescale", None, int, 1)
    c.lr_scheduler_min_lr_ratio = _number(raw, "lr_scheduler_min_lr_ratio", None, float, 0)

    # get_scheduler_fix's refusals of a warm-up the schedule cannot apply
    relative_adafactor = c.optimizer_type.lower() == "adafactor" and (
        c.optimizer_args.get("relative_step", True) or c.optimizer_args.get("warmup_init", False)
    )
    schedule_free = c.optimizer_type.lower().endswith("schedulefree")
    if c.lr_warmup_steps and not schedule_free:
        if c.lr_scheduler_type:
            raise TrainingError(f"lr_warmup_steps must be 0 with lr_scheduler_type {c.lr_scheduler_type!r}")
        if relative_adafactor:
            raise TrainingError("lr_warmup_steps must be 0 with Adafactor's relative_step schedule")
        if scheduler in ("constant", "adafactor"):
            raise TrainingError(f"lr_warmup_steps must be 0 with lr_scheduler {scheduler} (use constant_with_warmup)")
    if scheduler == "adafactor" and not relative_adafactor and not c.lr_scheduler_type and not schedule_free:
        raise TrainingError('lr_scheduler adafactor needs optimizer_type "Adafactor" with relative_step=True')


def _step_saves(raw: Mapping[str, Any], c: TrainingConfig, warnings: list[str]) -> None:
    """kohya's step-based saves: ``save_every_n_steps`` (a file, and with ``save_state`` a state, after every
    n-th optimizer step), ``save_last_n_steps`` / ``save_last_n_steps_state`` (how many *steps* back the saves
    are kept) and ``save_n_epoch_ratio`` (at least that many epoch saves in the run). Whole numbers from 1: kohya
    would divide by a zero ``save_every_n_steps``; what has no effect in kohya either is reported."""
    c.save_every_n_steps = _number(raw, "save_every_n_steps", None, int, 1)
    c.save_last_n_steps = _number(raw, "save_last_n_steps", None, int, 1)
    c.save_last_n_steps_state = _number(raw, "save_last_n_steps_state", None, int, 1)
    c.save_n_epoch_ratio = _number(raw, "save_n_epoch_ratio", None, int, 1)
    for key in ("save_last_n_steps", "save_last_n_steps_state"):
        if getattr(c, key) is not None and not c.save_every_n_steps:
            warnings.append(f"{key} has no effect without save_every_n_steps")
    if c.save_last_n_steps_state is not None and c.save_every_n_steps and not c.save_state:
        warnings.append("save_last_n_steps_state has no effect without save_state")
    if c.save_n_epoch_ratio and c.save_every_n_epochs:
        warnings.append("save_every_n_epochs is replaced by what save_n_epoch_ratio gives (as in kohya)")


def output_file_names(config: TrainingConfig, epochs: int, total_steps: int | None = None) -> list[str]:
    """Every file a run of ``epochs`` epochs and ``total_steps`` optimizer steps may write (before the
    ``save_last_n_*`` options delete older ones), the training states included, so a caller can presign an upload
    URL for each: the epoch files, the epoch states, the step files (every multiple of ``save_every_n_steps`` up
    to ``total_steps``, the last step included, as kohya saves it before it stops), the step states, the final
    file and the final state. Without ``total_steps`` no step files are listed."""
    names = []
    interval = config.epoch_interval(epochs)
    if interval:
        saved = [e for e in range(1, epochs) if e % interval == 0]
        names += [config.epoch_file(e) for e in saved]
        if config.save_state:
            names += [config.epoch_state_file(e) for e in saved]
    if config.save_every_n_steps and total_steps:
        steps = range(config.save_every_n_steps, total_steps + 1, config.save_every_n_steps)
        names += [config.step_file(s) for s in steps]
        if config.save_state:
            names += [config.step_state_file(s) for s in steps]
    names.append(config.final_file())
    if config.save_state or config.save_state_on_train_end:
        names.append(config.final_state_file())
    return names
