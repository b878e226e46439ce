"""A1111 sampler names -> diffusers schedulers, built fresh for every pipeline call from the checkpoint's pristine
scheduler config.

Why fresh and explicit: a scheduler built ``from_config`` of the *previous* job's scheduler inherits its options
(Karras sigmas, the SDE algorithm), so "Euler" after "DPM++ 2M SDE Karras" silently kept Karras sigmas. Here only
the model's own noise schedule (betas, prediction type, training steps) is taken from the checkpoint, and every
option that distinguishes samplers is set explicitly for each name. Schedules follow A1111 v1.8.0: k-diffusion
samplers start at sigma_max with t = linspace(999, 0, n) (diffusers' "linspace" spacing), DDIM/PLMS/UniPC use
Stability's "leading" timesteps with offset 1, and the SDE samplers' Brownian noise is seeded per image from the
images' seeds (A1111's ``create_noise_sampler``), so a seed gives the same image alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.policy import DEFAULT_SAMPLER, SAMPLER_NAMES

# Only these keys of a checkpoint's scheduler config describe the model (its training noise schedule).
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")

_KDIFF = {"timestep_spacing": "linspace", "steps_offset": 0}
_KARRAS = {"use_karras_sigmas": True}
_PLAIN = {"use_karras_sigmas": False}
_DPM = {**_KDIFF, "solver_order": 2, "lower_order_final": True, "final_sigmas_type": "zero", "euler_at_final": False}
_STABILITY = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}

# name -> (diffusers scheduler class name, every option that matters for it)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {**_KDIFF}),
    "Euler": ("EulerDiscreteScheduler", {**_KDIFF, **_PLAIN, "interpolation_type": "linear"}),
    "LMS": ("LMSDiscreteScheduler", {**_KDIFF, **_PLAIN}),
    "LMS Karras": ("LMSDiscreteScheduler", {**_KDIFF, **_KARRAS}),
    "Heun": ("HeunDiscreteScheduler", {**_KDIFF, **_PLAIN}),
    "DPM2": ("KDPM2DiscreteScheduler", {**_KDIFF, **_PLAIN}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {**_KDIFF, **_PLAIN}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {**_DPM, **_PLAIN, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_DPM, **_KARRAS, "algorithm_type": "dpmsolver++"}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**_DPM, **_PLAIN, "algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {**_DPM, **_KARRAS, "algorithm_type": "sde-dpmsolver++"},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {**_KDIFF, **_PLAIN}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {**_KDIFF, **_KARRAS}),
    "DDIM": ("DDIMScheduler", {**_STABILITY, "clip_sample": False, "thresholding": False}),
    "PLMS": ("PNDMScheduler", {**_STABILITY, "skip_prk_steps": True}),
    "UniPC": (
        "UniPCMultistepScheduler",
        {
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "solver_type": "bh1",
            "solver_order": 3,
            "lower_order_final": True,
            "predict_x0": True,
            "use_karras_sigmas": False,
        },
    ),
    # A1111's LCM (sd_samplers_lcm): x0 each step, re-noised to the next timestep, on its own timesteps below.
    "LCM": (
        "LCMScheduler",
        {"original_inference_steps": 50, "set_alpha_to_one": False, "steps_offset": 0, "clip_sample": False},
    ),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "the policy's sampler list and the engine's map must agree"
# Samplers that evaluate the model twice per step (A1111 counts their steps twice for prompt editing and refiner).
SECOND_ORDER = ("Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ SDE Karras")
BROWNIAN = ("DPM++ SDE", "DPM++ SDE Karras")


def custom_timesteps(name: str, steps: int) -> list[int] | None:
    """The timesteps a sampler runs when they are not diffusers' own: A1111's LCM takes ``steps`` points of a
    50-point grid (t = 20k - 1), evenly from the top: 4 steps give [999, 679, 339, 19] where diffusers' LCM
    scheduler would give [999, 759, 499, 259]."""
    if name != "LCM":
        return None
    if steps == 1:
        return [999]
    grid = [50 - (50 - 1) * i / (steps - 1) for i in range(steps)]
    return sorted({20 * round(k) - 1 for k in grid}, reverse=True)


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a scheduler config that belongs to the model, not to a sampler."""
    return {key: config[key] for key in MODEL_KEYS if key in config}


def scheduler_for(name: str | None, base_config: Mapping[str, Any], seeds: Sequence[int] | None = None) -> Any:
    """A new scheduler for A1111 sampler ``name`` (None: A1111's default) on a checkpoint's pristine scheduler
    config; ``seeds`` are the images' seeds, which seed the SDE samplers' Brownian noise per image."""
    import diffusers

    name = name or DEFAULT_SAMPLER
    if name not in SAMPLERS:
        raise JobError(f"sampler {name} is not supported; use one of: {', '.join(SAMPLERS)}")
    class_name, options = SAMPLERS[name]
    options = dict(options)
    if name in BROWNIAN:
        options["noise_sampler_seed"] = list(seeds) if seeds else None
    return getattr(diffusers, class_name).from_config(model_config(base_config), **options)
