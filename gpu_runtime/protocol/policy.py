"""The parameter policy: every field of A1111's txt2img, img2img and extras requests, and what this runtime does
with it.

Why one table: ESD clients send whole A1111 request objects (about fifty fields at their defaults, every installed
extension listed in ``alwayson_scripts`` with its arguments, ``Infinity`` in ``s_tmax``). A field the runtime does
not implement must never be dropped silently - a job that succeeds did what it was asked - so each field is
classified once, here, and the engine, the SageMaker serve mode and the console all ask :func:`check`:

- *honoured*: the engine implements it;
- *inert*: A1111 itself ignores it through the API, or it only changes where files are saved;
- *not supported*: accepted only at a value that does nothing (its default, or any value while the switch that
  activates it is off); any other value is refused with a message naming the field and the value, before any GPU
  time is spent.

Fields A1111 does not know are ignored as A1111 ignores them, but listed in ``info.ignored_parameters``.
Standard library only: the control plane imports this module (the console validates its form with it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpu_runtime.protocol.scripts import FACE_RESTORERS

HONOURED, INERT, UNSUPPORTED = "honoured", "inert", "not supported"

# A1111 v1.8.0's sampler names, in its order (the names carry their sigma schedule); the engine runs the
# k-diffusion ones on A1111's own loops and the last four on diffusers' schedulers (gpu_runtime.samplers).
K_DIFFUSION_SAMPLERS = (
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DPM++ 2M SDE Exponential",
    "DPM++ 2M SDE Karras",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ 2M",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2M SDE Heun Karras",
    "DPM++ 2M SDE Heun Exponential",
    "DPM++ 3M SDE",
    "DPM++ 3M SDE Karras",
    "DPM++ 3M SDE Exponential",
    "DPM fast",
    "LMS Karras",
    "DPM2 Karras",
    "DPM2 a Karras",
    "DPM++ 2S a Karras",
    "Restart",
)
SAMPLER_NAMES = (*K_DIFFUSION_SAMPLERS, "DDIM", "PLMS", "UniPC", "LCM")
# The v1.9 ``scheduler`` field (label or name) -> the sigma schedule; "Automatic" keeps the sampler's own. A schedule
# suffix in the sampler's name wins over the field, as in A1111 v1.9's get_sampler_and_scheduler.
SCHEDULERS = {
    "Automatic": "automatic",
    "Uniform": "uniform",
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
}
_SCHEDULE_SUFFIXES = (" Karras", " Exponential")
# A1111's API: ``sampler_name or sampler_index``, and ``sampler_index`` defaults to "Euler" (modules/api/models.py).
DEFAULT_SAMPLER = "Euler"
DEFAULT_STEPS = 50  # StableDiffusionProcessing.steps
TASKS = ("txt2img", "img2img", "extra-single-image", "extra-batch-images", "rembg")
FAMILIES = ("sd15", "sd2", "sdxl", "sd15-inpainting", "sd2-inpainting", "sdxl-inpainting")
PIL_UPSCALERS = ("None", "Lanczos", "Nearest")
# hires fix's hr_upscaler names this runtime runs: A1111's latent modes, then the PIL upscalers
HIRES_UPSCALERS = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
    "Lanczos",
    "Nearest",
)


class PolicyError(ValueError):
    """A request asks for something this runtime does not do; the text names the field (or script) and value."""


@dataclass(frozen=True)
class Field:
    """How one request field is treated.

    ``inert`` lists the values at which an unsupported field does nothing; ``unless`` names a predicate over the
    whole request that, when false, makes any value inert (hires fields while ``enable_hr`` is off).
    """

    status: str
    inert: tuple[Any, ...] = ()
    unless: Callable[[Mapping[str, Any]], bool] | None = None
    issue: str = ""  # where support is planned, for the capabilities document


def _on(name: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda params: bool(params.get(name))


def _positive(name: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda params: _number_or_zero(params.get(name)) > 0


def _number_or_zero(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _has_script(params: Mapping[str, Any]) -> bool:
    return params.get("script_name") not in (None, "", "None")


_HR, _MASK = _on("enable_hr"), _on("mask")
HON, INE = Field(HONOURED), Field(INERT)

COMMON: dict[str, Field] = {
    "prompt": HON,
    "negative_prompt": HON,
    "styles": Field(UNSUPPORTED, (None, ()), issue="saved styles do not exist on this server"),
    "seed": HON,
    "subseed": Field(UNSUPPORTED, unless=_positive("subseed_strength"), issue="12"),
    "subseed_strength": Field(UNSUPPORTED, (0, None), issue="12"),
    "seed_resize_from_h": Field(UNSUPPORTED, (-1, 0, None), issue="12"),
    "seed_resize_from_w": Field(UNSUPPORTED, (-1, 0, None), issue="12"),
    "sampler_name": HON,
    "sampler_index": HON,
    "scheduler": HON,  # schedule_of
    "batch_size": HON,
    "n_iter": HON,
    "steps": HON,
    "cfg_scale": HON,
    "width": HON,
    "height": HON,
    "restore_faces": HON,  # gpu_runtime.face_restoration, with override face_restoration_model
    "tiling": HON,
    "do_not_save_samples": INE,
    "do_not_save_grid": INE,
    "send_images": INE,
    "save_images": INE,
    "eta": HON,  # checked against the sampler by check_sampler_options
    "s_min_uncond": Field(UNSUPPORTED, (None, 0), issue="12"),
    # the samplers A1111 passes them to use them (gpu_runtime.samplers.K_SAMPLERS.takes); the others ignore them
    **{name: HON for name in ("s_churn", "s_tmin", "s_tmax", "s_noise")},
    "override_settings": HON,  # key by key: OVERRIDES
    "override_settings_restore_afterwards": INE,  # every job starts from the same settings here
    "refiner_checkpoint": HON,  # a checkpoint of the model's family (SDXL refiner checkpoints: not yet)
    "refiner_switch_at": HON,
    "disable_extra_networks": HON,
    "firstpass_image": Field(UNSUPPORTED, (None, ""), issue="12"),
    "comments": INE,  # A1111 resets it
    "force_task_id": INE,
    "infotext": Field(UNSUPPORTED, (None, ""), issue="12"),
    "script_name": HON,  # by name: SCRIPTS
    "script_args": INE,  # read by the selected script only (A1111 ignores it without script_name)
    "alwayson_scripts": HON,  # script by script: ALWAYSON
}
HIRES: dict[str, Field] = {
    "enable_hr": Field(UNSUPPORTED, (None, False), issue="12"),
    "denoising_strength": Field(UNSUPPORTED, unless=_HR, issue="12"),  # txt2img: only the hires pass uses it
    **{
        name: Field(UNSUPPORTED, unless=_HR, issue="12")
        for name in (
            "firstphase_width",
            "firstphase_height",
            "hr_scale",
            "hr_upscaler",
            "hr_second_pass_steps",
            "hr_resize_x",
            "hr_resize_y",
            "hr_checkpoint_name",
            "hr_sampler_name",
            "hr_scheduler",
            "hr_prompt",
            "hr_negative_prompt",
        )
    },
}
# txt2img draws its starting noise itself, so A1111's variation seeds, seed resizing and tiling are honoured there.
# Hires fix is honoured except a second checkpoint and the legacy first-pass size.
TXT2IMG: dict[str, Field] = {
    **COMMON,
    **{name: HON for name in ("subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w")},
    **{name: HON for name in HIRES},
    "firstphase_width": Field(UNSUPPORTED, (0, None), issue="12"),
    "firstphase_height": Field(UNSUPPORTED, (0, None), issue="12"),
    "hr_checkpoint_name": Field(UNSUPPORTED, (None, "", "Use same checkpoint"), issue="12"),
}
IMG2IMG: dict[str, Field] = {
    **COMMON,
    "init_images": HON,
    "denoising_strength": HON,
    "resize_mode": HON,  # 0-2 resize the image, 3 its latents
    "image_cfg_scale": INE,  # only InstructPix2Pix models use it; A1111 sets it to None for every other model
    "include_init_images": INE,  # only echoes the inputs in ``parameters``, which are always echoed here
    "mask": HON,  # inpainting with any checkpoint; 9-channel inpainting checkpoints get A1111's image conditioning
    "latent_mask": Field(UNSUPPORTED, (None, ""), issue="12"),
    "initial_noise_multiplier": HON,  # k-diffusion samplers
    **{
        name: HON
        for name in (
            "mask_blur",
            "mask_blur_x",
            "mask_blur_y",
            "mask_round",
            "inpainting_fill",
            "inpaint_full_res",
            "inpaint_full_res_padding",
            "inpainting_mask_invert",
        )
    },
}
EXTRAS: dict[str, Field] = {
    "resize_mode": HON,
    "show_extras_results": INE,
    "gfpgan_visibility": HON,  # gpu_runtime.extras.postprocess
    "codeformer_visibility": HON,
    "codeformer_weight": HON,
    "upscaling_resize": HON,
    "upscaling_resize_w": HON,
    "upscaling_resize_h": HON,
    "upscaling_crop": HON,
    "upscaler_1": HON,  # PIL_UPSCALERS, or an ESRGAN checkpoint by file stem (gpu_runtime.upscalers)
    "upscaler_2": HON,
    "extras_upscaler_2_visibility": HON,
    "upscale_first": INE,  # unused by A1111 v1.8.0's run_extras
}
EXTRA_SINGLE: dict[str, Field] = {**EXTRAS, "image": HON}
EXTRA_BATCH: dict[str, Field] = {**EXTRAS, "imageList": HON}
REMBG: dict[str, Field] = {
    "input_image": HON,
    "model": HON,
    "return_mask": HON,  # gpu_runtime.extras: rembg.remove as the rembg extension calls it
    "alpha_matting": HON,
    "alpha_matting_foreground_threshold": HON,
    "alpha_matting_background_threshold": HON,
    "alpha_matting_erode_size": HON,
}
FIELDS: dict[str, dict[str, Field]] = {
    "txt2img": TXT2IMG,
    "img2img": IMG2IMG,
    "extra-single-image": EXTRA_SINGLE,
    "extra-batch-images": EXTRA_BATCH,
    "rembg": REMBG,
}

# override_settings keys (A1111 opts). Honoured ones are read by the engine; the others are accepted only at A1111's
# default value. Keys that do not change generation (UI and saving options) are ignored and listed.
HONOURED_OVERRIDES = (
    "sd_model_checkpoint",
    "sd_vae",
    "CLIP_stop_at_last_layers",
    "randn_source",
    "k_sched_type",  # v1.8's schedule override for every k-diffusion sampler (the xyz "Schedule type" axis)
    "always_discard_next_to_last_sigma",
    "face_restoration",  # opts.face_restoration: restore_faces when the request leaves it null
    "face_restoration_model",
    "code_former_weight",
)
K_SCHED_TYPES = ("Automatic", "karras", "exponential", "polyexponential")
TXT2IMG_OVERRIDES = ("eta_noise_seed_delta",)  # re-seeds the per-image generators after the first noise draw
RANDN_SOURCES = ("GPU", "CPU")
OVERRIDE_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "sd_vae_overrides_per_model_preferences": (True, False),
    "sd_unet": ("Automatic", "None"),
    "sd_vae_encode_method": ("Full",),
    "sd_vae_decode_method": ("Full",),
    "auto_vae_precision": (True,),
    "emphasis": ("Original",),
    "comma_padding_backtrack": (20,),
    "use_old_scheduling": (False,),
    "use_old_emphasis_implementation": (False,),
    "enable_prompt_comments": (True,),
    "pad_cond_uncond": (False, True),  # the runtime pads (the True behaviour) and notes it in info when it does
    "sdxl_crop_top": (0,),
    "sdxl_crop_left": (0,),
    "sdxl_refiner_low_aesthetic_score": (2.5,),
    "sdxl_refiner_high_aesthetic_score": (6.0,),
    "extra_networks_default_multiplier": (1.0,),
    "sd_hypernetwork": ("None", ""),
    "eta_noise_seed_delta": (0,),
    "eta_ancestral": (1.0,),
    "eta_ddim": (0.0,),
    "ddim_discretize": ("uniform",),
    "enable_batch_seeds": (True,),
    "s_min_uncond": (0.0,),
    "s_churn": (0.0,),
    "s_tmin": (0.0,),
    "s_tmax": (0.0,),
    "s_noise": (1.0,),
    "sigma_min": (0.0,),
    "sigma_max": (0.0,),
    "rho": (0.0,),
    "sgm_noise_multiplier": (False,),
    "uni_pc_variant": ("bh1",),
    "uni_pc_skip_type": ("time_uniform",),
    "uni_pc_order": (3,),
    "uni_pc_lower_order_final": (True,),
    "sd_noise_schedule": ("Default",),
    "token_merging_ratio": (0.0,),
    "token_merging_ratio_img2img": (0.0,),
    "token_merging_ratio_hr": (0.0,),
    "img2img_fix_steps": (False,),
    "initial_noise_multiplier": (1.0,),
    "img2img_extra_noise": (0.0,),
    "inpainting_mask_weight": (1.0,),
    "img2img_color_correction": (False,),
    "img2img_background_color": ("#ffffff",),
    "upscaler_for_img2img": (None, "None", "Lanczos"),
    "ESRGAN_tile": (192,),  # gpu_runtime.upscalers tiles as A1111's defaults
    "ESRGAN_tile_overlap": (8,),
    "hires_fix_refiner_pass": ("second pass",),
    "face_restoration_unload": (False, True),  # only where the restorer waits between jobs
    "tiling": (False,),
    "samples_format": ("png",),
    "enable_pnginfo": (True, False),
    "return_grid": (True, False),
    "return_mask": (False,),
    "return_mask_composite": (False,),
    "hypertile_enable_unet": (False,),
    "hypertile_enable_unet_secondpass": (False,),
    "hypertile_enable_vae": (False,),
}

# Always-on scripts ESD's client sends (keys are A1111's lower-cased script titles) -> "is this entry enabled?".
# ``None`` means A1111's API never runs the script's setup (refiner, seed: setup_for_ui_only) or the script has no
# effect with default settings (extra options), so any arguments are inert.


def _arg(args: list, index: int, default: Any = None) -> Any:
    return args[index] if len(args) > index else default


def _adetailer_enabled(args: list) -> bool:
    first = _arg(args, 0, False)
    switched = first if isinstance(first, bool) else True
    models = [a for a in args if isinstance(a, dict)]
    return switched and any(str(m.get("ad_model", "None")) != "None" for m in models)


ALWAYSON: dict[str, Callable[[list], bool] | None] = {
    "refiner": None,
    "seed": None,
    "extra options": None,
    "comments": None,
    "tiled diffusion": lambda args: bool(_arg(args, 0, False)),
    "tiled vae": lambda args: bool(_arg(args, 0, False)),
    "adetailer": _adetailer_enabled,
    "roop": lambda args: bool(_arg(args, 1, False)),
    "reactor": lambda args: bool(_arg(args, 1, False)),
    "soft inpainting": lambda args: bool(_arg(args, 0, False)),
    "hypertile": lambda args: bool(_arg(args, 0, False)),
}
ALWAYSON_ISSUES = {"refiner": "12", "dynamic prompts": "12"}

# ControlNet units (sd-webui-controlnet's format): the preprocessors this runtime runs, with the extension's UI
# aliases. Others (canny, depth, openpose, ...) are refused by name.
CONTROLNET_MODULES = {
    "none": "none",
    "None": "none",
    "invert": "invert",
    "invert (from white bg & black line)": "invert",
    "canny": "canny",
    "threshold": "threshold",
    "blur_gaussian": "blur_gaussian",
    "tile_resample": "tile_resample",
    "scribble_xdog": "scribble_xdog",
    "lineart_standard": "lineart_standard",
    "lineart_standard (from white bg & black line)": "lineart_standard",
    "shuffle": "shuffle",
    "inpaint": "inpaint",
    "inpaint_global_harmonious": "inpaint",
    "inpaint_only": "inpaint_only",
    # with an uploaded annotator file (gpu_runtime.controlnet_annotators)
    "hed": "hed",
    "softedge_hed": "hed",
    "hed_safe": "hed_safe",
    "softedge_hedsafe": "hed_safe",
    "scribble_hed": "scribble_hed",
    "lineart": "lineart",
    "lineart_realistic": "lineart",
    "lineart_coarse": "lineart_coarse",
}
CONTROLNET_MAX_UNITS = 3  # the extension's control_net_unit_count
# the extension's control modes, by name or index (sd-webui-controlnet ``external_code.ControlMode``)
CONTROL_MODES = {"Balanced": 0, "My prompt is more important": 1, "ControlNet is more important": 2}


def control_mode(unit: Mapping[str, Any], index: int) -> int:
    """A unit's control mode as its index, or a refusal naming the value."""
    value = unit.get("control_mode")
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value in CONTROL_MODES.values():
        return value
    if isinstance(value, str) and value in CONTROL_MODES:
        return CONTROL_MODES[value]
    choices = ", ".join(CONTROL_MODES)
    raise PolicyError(f"ControlNet unit {index}: control_mode={render(value)} is not one of: {choices} (or 0, 1, 2)")


def controlnet_module(unit: Mapping[str, Any], index: int) -> str:
    """A unit's preprocessor as this runtime names it, or a refusal naming it."""
    module = unit.get("module", "none")
    found = CONTROLNET_MODULES.get(module) if isinstance(module, str) else None
    if found is None:
        choices = ", ".join(sorted(set(CONTROLNET_MODULES.values())))
        raise PolicyError(
            f"ControlNet unit {index}: module {render(module)} is not supported by this runtime; use one of: {choices}"
        )
    return found


def _check_controlnet(name: str, args: list, params: Mapping[str, Any]) -> None:
    """Each enabled unit may use only what the runtime does: its preprocessors and control modes, a mask only on
    the inpaint modules; ControlNet with hires fix or the refiner is refused as a whole."""
    for index, unit in enumerate(args[:CONTROLNET_MAX_UNITS]):
        if not isinstance(unit, Mapping):
            raise PolicyError(f"always-on script {name}: unit {index} must be an object")
        if unit.get("enabled", True) is False:
            continue
        module = controlnet_module(unit, index)
        control_mode(unit, index)
        image = unit.get("image")
        masked = unit.get("mask") or (isinstance(image, Mapping) and image.get("mask"))
        if masked and not module.startswith("inpaint"):  # the extension's effective-region masks
            raise PolicyError(f"ControlNet unit {index}: a mask on a {module} unit is not supported by this runtime")
        if params.get("enable_hr"):
            raise PolicyError("ControlNet with hires fix is not supported by this runtime")
        if params.get("refiner_checkpoint") not in (None, "", "None"):
            raise PolicyError("ControlNet with a refiner_checkpoint is not supported by this runtime")


# Selectable scripts (``script_name``) this runtime runs (A1111 matches them by lower-cased title).
SCRIPTS: tuple[str, ...] = ("x/y/z plot",)
_DYNAMIC_PROMPTS = re.compile(r"^dynamic prompts( v[\d.]+)?$")


@dataclass
class Checked:
    """What :func:`check` found: fields the client sent that A1111 does not know (ignored, and listed in
    ``info``), and notes on inert inputs worth telling the user about."""

    ignored: list[str]
    notes: list[str]


def render(value: Any) -> str:
    """A value as the client wrote it (JSON), short enough for an error message."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_inert(value: Any, inert: tuple[Any, ...]) -> bool:
    for candidate in inert:
        if candidate == () and isinstance(value, list | tuple) and not value:
            return True
        if candidate is None or isinstance(candidate, bool) or isinstance(value, bool):
            if value is candidate:
                return True
            continue
        if isinstance(candidate, int | float) and isinstance(value, int | float):
            if not (isinstance(value, float) and math.isnan(value)) and value == candidate:
                return True
        elif value == candidate:
            return True
    return False


def _in_range(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def refusal(name: str, value: Any) -> PolicyError:
    return PolicyError(f"{name}={render(value)} is not supported by this runtime")


def check(task: str, params: Mapping[str, Any]) -> Checked:
    """Refuse (``PolicyError``) anything the runtime would otherwise ignore; return what was ignored as unknown.

    Value ranges and types of honoured fields are the engine's to check; this only decides *whether* a field may
    be used at all, so the console can run it on a form before a job exists.
    """
    table = FIELDS.get(task)
    if table is None:
        raise PolicyError(f"task {task} is not supported by this runtime; use one of: {', '.join(TASKS)}")
    ignored, notes = [], []
    dependent = []
    for name, value in params.items():
        rule = table.get(name)
        if rule is None:
            ignored.append(name)
        elif rule.status == UNSUPPORTED and rule.unless is not None:
            dependent.append((name, value, rule))
        elif rule.status == UNSUPPORTED and not _is_inert(value, rule.inert):
            raise refusal(name, value)
    # Fields that only matter when a switch is on come second, so the switch itself is what gets named.
    for name, value, rule in dependent:
        if rule.unless(params) and not (rule.inert and _is_inert(value, rule.inert)):
            raise refusal(name, value)
    if task in ("txt2img", "img2img"):
        for name in ("prompt", "negative_prompt"):
            _check_prompt_syntax(name, params.get(name))
        _check_overrides(task, params.get("override_settings"), ignored)
        _check_alwayson(params.get("alwayson_scripts"), params, notes)
        _check_script(params)
        schedule_of(params, sampler_of(params))
    return Checked(sorted(ignored), notes)


# A1111 prompt syntax the runtime does not run: AND (composable diffusion) combines several predictions. Emphasis,
# BREAK, comments, prompt editing and alternation are honoured.
_AND = re.compile(r"\bAND\b")


def _check_prompt_syntax(name: str, text: Any) -> None:
    if not isinstance(text, str):
        return
    if _AND.search(text):
        raise PolicyError(f"{name}: AND (composable diffusion) is not supported by this runtime")


def _check_overrides(task: str, overrides: Any, ignored: list[str]) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, Mapping):
        raise PolicyError("override_settings must be an object")
    for key, value in overrides.items():
        if key in HONOURED_OVERRIDES or (task == "txt2img" and key in TXT2IMG_OVERRIDES):
            if key == "randn_source" and value not in RANDN_SOURCES:
                raise refusal(f"override_settings.{key}", value)
            if key == "k_sched_type" and value not in K_SCHED_TYPES:
                raise refusal(f"override_settings.{key}", value)
            if key in ("always_discard_next_to_last_sigma", "face_restoration") and not isinstance(value, bool):
                raise refusal(f"override_settings.{key}", value)
            if key == "face_restoration_model" and value not in FACE_RESTORERS:
                raise refusal(f"override_settings.{key}", value)
            if key == "code_former_weight" and not _in_range(value, 0, 1):
                raise refusal(f"override_settings.{key}", value)
            continue
        allowed = OVERRIDE_DEFAULTS.get(key)
        if allowed is None:
            ignored.append(f"override_settings.{key}")
        elif not _is_inert(value, allowed):
            raise refusal(f"override_settings.{key}", value)


def _check_alwayson(scripts: Any, params: Mapping[str, Any], notes: list[str]) -> None:
    if scripts in (None, {}):
        return
    if not isinstance(scripts, Mapping):
        raise PolicyError('alwayson_scripts must be an object of script name -> {"args": [...]}')
    for raw_name, entry in scripts.items():
        name = str(raw_name).lower()
        if not isinstance(entry, Mapping):
            raise PolicyError(f"alwayson_scripts.{raw_name} must be an object with args")
        if "args" not in entry:
            continue  # A1111: an entry without args changes nothing
        args = entry["args"]
        if not isinstance(args, list):
            raise PolicyError(f"alwayson_scripts.{raw_name}.args must be a list")
        if _DYNAMIC_PROMPTS.match(name):
            _check_dynamic_prompts(raw_name, args, params, notes)
            continue
        if name == "controlnet":
            _check_controlnet(raw_name, args, params)
            continue
        if name not in ALWAYSON:
            raise PolicyError(f"always-on script {raw_name} is not supported by this runtime")
        enabled = ALWAYSON[name]
        if enabled is not None and enabled(args):
            raise PolicyError(f"always-on script {raw_name} is enabled but not supported by this runtime")


def _check_dynamic_prompts(name: str, args: list, params: Mapping[str, Any], notes: list[str]) -> None:
    """Dynamic Prompts runs here (variants, wildcards, random and combinatorial modes: gpu_runtime.dynamic_prompts);
    its options that need a language model or templates are refused by name."""
    if not _arg(args, 0, True):
        return
    options = {3: "magic prompt", 4: "I'm feeling lucky", 5: "attention grabber", 13: "Jinja2 templates"}
    options[14] = "no image generation"
    for index, what in options.items():
        if _arg(args, index, False) is True:
            raise PolicyError(f"always-on script {name}: {what} is not supported by this runtime")


def _check_script(params: Mapping[str, Any]) -> None:
    name = params.get("script_name")
    if name in (None, "", "None"):
        return
    if str(name).lower() not in SCRIPTS:
        raise PolicyError(f"script {name} is not supported by this runtime")


def sampler_of(params: Mapping[str, Any], field: str = "sampler_name") -> str:
    """The sampler A1111's API would use: ``sampler_name or sampler_index`` (default "Euler")."""
    name = params.get(field) or params.get("sampler_index") or DEFAULT_SAMPLER
    if name not in SAMPLER_NAMES:
        raise PolicyError(f"sampler {name} is not supported; use one of: {', '.join(SAMPLER_NAMES)}")
    return str(name)


def schedule_of(params: Mapping[str, Any], sampler: str, field: str = "scheduler") -> str:
    """The sigma schedule the v1.9 ``scheduler`` field asks for ("automatic": the sampler's own). A sampler name
    that carries its schedule keeps it; DDIM, PLMS, UniPC and LCM have fixed timesteps and refuse any other."""
    value = params.get(field)
    if value in (None, ""):
        return "automatic"
    by_name = {label.lower(): key for label, key in SCHEDULERS.items()} | {k: k for k in SCHEDULERS.values()}
    schedule = by_name.get(str(value).lower())
    if schedule is None:
        choices = ", ".join(SCHEDULERS)
        raise PolicyError(f"{field}={render(value)} is not supported by this runtime; use one of: {choices}")
    if schedule == "automatic" or sampler.endswith(_SCHEDULE_SUFFIXES):
        return "automatic"
    if sampler not in K_DIFFUSION_SAMPLERS:
        raise PolicyError(f"{field}={render(value)} is not supported with sampler {sampler} (fixed timesteps)")
    return schedule


# ``eta``: DDIM takes it as ``eta_ddim``; the ancestral, SDE and DPM fast samplers as ``eta_ancestral``.
ETA_SAMPLERS = ("DDIM",)


def capabilities() -> dict[str, Any]:
    """What this runtime does, for ``python -m gpu_runtime capabilities``, the heartbeat and the console."""
    fields = {
        task: {
            status: sorted(name for name, rule in table.items() if rule.status == status)
            for status in (HONOURED, INERT, UNSUPPORTED)
        }
        for task, table in FIELDS.items()
    }
    return {
        "tasks": list(TASKS),
        "families": list(FAMILIES),
        "samplers": list(SAMPLER_NAMES),
        "schedulers": list(SCHEDULERS),
        "default_sampler": DEFAULT_SAMPLER,
        "upscalers": list(PIL_UPSCALERS),
        "hires_upscalers": list(HIRES_UPSCALERS),
        # besides the built-in ones: any checkpoint of these types, named by file stem (spandrel architectures)
        "model_upscaler_types": ["ESRGAN"],
        "scripts": list(SCRIPTS),
        "alwayson_scripts": {
            "inert": sorted(name for name, enabled in ALWAYSON.items() if enabled is None),
            "refused_when_enabled": sorted(name for name, enabled in ALWAYSON.items() if enabled is not None),
            "honoured": ["dynamic prompts", "controlnet"],
            "controlnet_modules": sorted(set(CONTROLNET_MODULES.values())),
        },
        "override_settings": {"honoured": list(HONOURED_OVERRIDES), "default_only": sorted(OVERRIDE_DEFAULTS)},
        "fields": fields,
    }


def digest(document: Mapping[str, Any]) -> str:
    """A short stable hash of a capabilities document (workers of one build report the same digest)."""
    import hashlib

    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:12]
