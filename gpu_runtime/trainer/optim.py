"""kohya's ``optimizer_type`` and ``lr_scheduler`` on what this host provides (AdamW when an optimizer is missing)."""

from __future__ import annotations

from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError


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
