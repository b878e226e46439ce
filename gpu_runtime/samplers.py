"""A1111 sampler names -> the schedulers that run them, built fresh for every pipeline call.

Why fresh and explicit: a scheduler built ``from_config`` of the *previous* job's scheduler inherits its options,
so every call gets a new one made from the checkpoint's pristine noise schedule (betas, prediction type), and every
option that distinguishes samplers is set here, by name.

Two kinds, as in A1111 v1.8.0:

- the k-diffusion samplers (``sd_samplers_kdiffusion.samplers_k_diffusion``) run A1111's own loops on A1111's
  sigma schedules (:mod:`gpu_runtime.kdiffusion`), with its per-sampler schedule, "discard penultimate sigma",
  second-order flag and the extra parameters A1111 passes to each (``sampler_extra_params`` and ``eta``);
- DDIM, PLMS, UniPC and LCM (``sd_samplers_timesteps``, ``sd_samplers_lcm``) are diffusers' schedulers: DDIM and
  PLMS on Stability's "leading" timesteps with offset 1, UniPC on A1111's time-uniform grid, LCM on A1111's own
  50-point grid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.policy import DEFAULT_SAMPLER, SAMPLER_NAMES

# Only these keys of a checkpoint's scheduler config describe the model (its training noise schedule).
MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_NOISY = ("eta", "s_noise")


@dataclass(frozen=True)
class KSampler:
    """One A1111 k-diffusion sampler: its loop, default schedule and options, and the request parameters A1111
    passes to it (any other of eta/s_churn/s_tmin/s_tmax/s_noise is ignored by A1111 for this sampler)."""

    loop: str
    schedule: str = "automatic"
    discard: bool = False
    second_order: bool = False
    takes: tuple[str, ...] = ()
    solver_type: str = "midpoint"


def _sde(loop: str, schedule: str = "automatic", **options: Any) -> KSampler:
    return KSampler(loop, schedule, takes=_NOISY, **options)


# A1111 v1.8.0's list, in its order. "Euler a" takes eta but not s_noise: A1111 leaves it out of
# sampler_extra_params. DPM adaptive picks its own number of model calls, which a pipeline loop cannot host.
K_SAMPLERS: dict[str, KSampler] = {
    "DPM++ 2M Karras": KSampler("dpmpp_2m", "karras"),
    "DPM++ SDE Karras": KSampler("dpmpp_sde", "karras", second_order=True, takes=_NOISY),
    "DPM++ 2M SDE Exponential": _sde("dpmpp_2m_sde", "exponential"),
    "DPM++ 2M SDE Karras": _sde("dpmpp_2m_sde", "karras"),
    "Euler a": KSampler("euler_ancestral", takes=("eta",)),
    "Euler": KSampler("euler", takes=_CHURN),
    "LMS": KSampler("lms"),
    "Heun": KSampler("heun", second_order=True, takes=_CHURN),
    "DPM2": KSampler("dpm_2", discard=True, second_order=True, takes=_CHURN),
    "DPM2 a": KSampler("dpm_2_ancestral", discard=True, second_order=True, takes=_NOISY),
    "DPM++ 2S a": KSampler("dpmpp_2s_ancestral", second_order=True, takes=_NOISY),
    "DPM++ 2M": KSampler("dpmpp_2m"),
    "DPM++ SDE": KSampler("dpmpp_sde", second_order=True, takes=_NOISY),
    "DPM++ 2M SDE": _sde("dpmpp_2m_sde"),
    "DPM++ 2M SDE Heun": _sde("dpmpp_2m_sde", solver_type="heun"),
    "DPM++ 2M SDE Heun Karras": _sde("dpmpp_2m_sde", "karras", solver_type="heun"),
    "DPM++ 2M SDE Heun Exponential": _sde("dpmpp_2m_sde", "exponential", solver_type="heun"),
    "DPM++ 3M SDE": _sde("dpmpp_3m_sde", discard=True),
    "DPM++ 3M SDE Karras": _sde("dpmpp_3m_sde", "karras", discard=True),
    "DPM++ 3M SDE Exponential": _sde("dpmpp_3m_sde", "exponential", discard=True),
    "DPM fast": KSampler("dpm_fast", takes=_NOISY),
    "LMS Karras": KSampler("lms", "karras"),
    "DPM2 Karras": KSampler("dpm_2", "karras", discard=True, second_order=True, takes=_CHURN),
    "DPM2 a Karras": KSampler("dpm_2_ancestral", "karras", discard=True, second_order=True, takes=_NOISY),
    "DPM++ 2S a Karras": KSampler("dpmpp_2s_ancestral", "karras", second_order=True, takes=_NOISY),
    "Restart": KSampler("restart", "karras", second_order=True),
}

_STABILITY = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
# name -> (diffusers scheduler class name, every option that matters for it)
TIMESTEP_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {**_STABILITY, "clip_sample": False, "thresholding": False}),
    "PLMS": ("PNDMScheduler", {**_STABILITY, "skip_prk_steps": True}),
    # A1111 runs UniPC on a continuous time-uniform grid from t=999 down to t=0 (uni_pc.py, skip_type
    # "time_uniform"): diffusers' linspace timesteps ending at the model's smallest sigma (rounded to whole t).
    "UniPC": (
        "UniPCMultistepScheduler",
        {
            "timestep_spacing": "linspace",
            "steps_offset": 0,
            "final_sigmas_type": "sigma_min",
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
SAMPLERS: dict[str, Any] = {**K_SAMPLERS, **TIMESTEP_SAMPLERS}
assert tuple(SAMPLERS) == SAMPLER_NAMES, "the policy's sampler list and the engine's map must agree"
# Samplers whose steps A1111 counts twice for prompt editing and the refiner (``SamplerData.total_steps``).
SECOND_ORDER = tuple(name for name, s in K_SAMPLERS.items() if s.second_order)


def is_k_diffusion(name: str) -> bool:
    return name in K_SAMPLERS


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


def options_for(name: str, values: Mapping[str, float]) -> Any:
    """The k-diffusion options A1111 would pass to sampler ``name``: the request's values for the parameters it
    takes, A1111's defaults for the rest."""
    from gpu_runtime.kdiffusion import Options

    sampler = K_SAMPLERS[name]
    taken = {key: float(value) for key, value in values.items() if key in sampler.takes and value is not None}
    return Options(solver_type=sampler.solver_type, **taken)


def scheduler_for(
    name: str | None,
    base_config: Mapping[str, Any],
    seeds: Sequence[int] | None = None,
    *,
    generators: Sequence[Any] | None = None,
    options: Mapping[str, float] | None = None,
    schedule: str | None = None,
    discard: bool = False,
    denoise: int | None = None,
) -> Any:
    """A new scheduler for A1111 sampler ``name`` (None: A1111's default) on a checkpoint's pristine scheduler
    config. ``seeds`` and ``generators`` are the images' own (the SDE samplers' Brownian trees and the ancestral
    noise); ``schedule`` replaces the sampler's own sigma schedule (the v1.9 ``scheduler`` field); ``denoise``
    runs only the last steps of the schedule (img2img: call the pipeline with strength 1); ``discard`` drops the
    penultimate sigma whatever the sampler (``always_discard_next_to_last_sigma``)."""
    name = name or DEFAULT_SAMPLER
    if name not in SAMPLERS:
        raise JobError(f"sampler {name} is not supported; use one of: {', '.join(SAMPLERS)}")
    if name in K_SAMPLERS:
        from gpu_runtime.kdiffusion import KDiffusionScheduler, ModelSigmas

        sampler = K_SAMPLERS[name]
        try:
            sigmas = ModelSigmas(model_config(base_config))
        except ValueError as exc:
            raise JobError(str(exc)) from None
        return KDiffusionScheduler(
            sampler.loop,
            sigmas,
            schedule=schedule if schedule not in (None, "automatic") else sampler.schedule,
            discard=sampler.discard or discard,
            options=options_for(name, options or {}),
            generators=generators,
            seeds=seeds,
            denoise=denoise,
        )
    if denoise is not None:
        raise ValueError("denoise is for the k-diffusion samplers; timestep samplers take the pipeline's strength")
    import diffusers

    class_name, settings = TIMESTEP_SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(model_config(base_config), **settings)


def model_calls(scheduler: Any, steps: int) -> int:
    """How many model calls a scheduler set to ``steps`` will make (for progress)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)
