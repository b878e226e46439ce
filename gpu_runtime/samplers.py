"""A1111 sampler names -> diffusers schedulers, built from the loaded model's own scheduler config.

Keeping the model's config (betas, prediction type, timestep spacing) and changing only the algorithm is what
makes "Euler a" on an SD 2.x v-prediction model behave like A1111's.
"""

from __future__ import annotations

from typing import Any

from gpu_runtime.errors import JobError

# name -> (diffusers scheduler class name, config overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SAMPLER = "Euler a"


def scheduler_for(name: str | None, base_config: Any) -> Any:
    """A scheduler for A1111 sampler ``name`` (None: the A1111 default, Euler a); unknown names are a JobError."""
    import diffusers

    name = name or DEFAULT_SAMPLER
    if name not in SAMPLERS:
        raise JobError(f"sampler {name} is not supported; use one of: {', '.join(SAMPLERS)}")
    class_name, overrides = SAMPLERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)
