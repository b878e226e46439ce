"""kohya's ``optimizer_type`` (``train_util.get_optimizer``), ``lr_scheduler`` (``train_util.get_scheduler_fix``) and
the training precision (``mixed_precision``, ``full_fp16``/``full_bf16`` as ``train_network.py`` applies them).

An optimizer or schedule that is asked for and cannot be provided fails the job: nothing is silently replaced
(a LoRA trained with AdamW at Prodigy's learning rate of 1.0 is garbage, and a quietly different optimizer is a
different LoRA).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError

# kohya's named optimizers (lower-cased ``optimizer_type``) -> (module, class)
_NAMED = {
    "adamw": ("torch.optim", "AdamW"),
    "sgdnesterov": ("torch.optim", "SGD"),
    "lion": ("lion_pytorch", "Lion"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit"),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit"),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW"),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
}
# The PyPI name a missing module comes from, for the error message.
# D-Adaptation/Prodigy classes that adapt one step size and raise on their first step when parameter groups have
# different non-zero learning rates: refused at the start instead.
_ONE_LR = frozenset({"dadaptation", "dadaptadampreprint", "dadaptadam", "dadaptlion", "dadaptsgd", "prodigy"})
_PACKAGE = {
    "lion_pytorch": "lion-pytorch",
    "bitsandbytes": "bitsandbytes",
    "dadaptation": "dadaptation",
    "prodigyopt": "prodigyopt",
    "schedulefree": "schedulefree",
    "transformers": "transformers",
    "pytorch_optimizer": "pytorch-optimizer",
    "came_pytorch": "came-pytorch",
    "prodigyplus": "prodigy-plus-schedule-free",
}
# kohya imports any ``module.Class`` it is given; a job config comes from users, so only these packages are imported
# for a dotted optimizer_type / lr_scheduler_type, and the class must be an optimizer / a learning-rate scheduler.
_OPTIMIZER_PACKAGES = frozenset({"torch", *_PACKAGE})
_SCHEDULER_PACKAGES = frozenset({"torch", "transformers", "diffusers", "pytorch_optimizer", "timm"})


def _import_class(name: str, module: str, attribute: str, what: str) -> Any:
    """``module.attribute``, or a TrainingError naming the option and the package to install."""
    top = module.split(".")[0]
    try:
        found = getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == top and top in _PACKAGE:
            raise TrainingError(
                f"{what} {name} needs the {_PACKAGE[top]} package, which is not installed on this worker"
            ) from None
        raise TrainingError(f"{what} {name}: module {module} could not be imported ({exc})") from None
    except ImportError as exc:
        raise TrainingError(f"{what} {name} needs the {_PACKAGE.get(top, top)} package: {exc}") from None
    except AttributeError:
        raise TrainingError(f"{what} {name}: {module} has no {attribute}") from None
    except Exception as exc:  # e.g. bitsandbytes raises RuntimeError when its native library fails
        raise TrainingError(f"{what} {name}: the {_PACKAGE.get(top, top)} package cannot run here ({exc})") from None
    return found


def _custom_class(name: str, default_module: str, allowed: frozenset[str], base: type, what: str) -> type:
    """kohya's "any class": a bare name from ``default_module``, else ``package.module.Class``."""
    module, _, attribute = name.rpartition(".")
    module = module or default_module
    if module.split(".")[0] not in allowed:
        raise TrainingError(
            f"{what} {name} is not supported: classes are imported only from {', '.join(sorted(allowed))}"
        )
    found = _import_class(name, module, attribute, what)
    if not (isinstance(found, type) and issubclass(found, base)):
        raise TrainingError(f"{what} {name} is not a {base.__module__}.{base.__qualname__} class")
    return found


def _is_schedule_free(config: TrainingConfig) -> bool:
    """kohya's ``is_schedulefree_optimizer``: by name."""
    return config.optimizer_type.lower().endswith("schedulefree")


def _optimizer(
    config: TrainingConfig, groups: list[dict[str, Any]], warnings: list[str]
) -> tuple[torch.optim.Optimizer, str]:
    """kohya's ``get_optimizer``: the optimizer over the LoRA parameter groups (each with its own ``lr``; the base
    ``lr`` is ``learning_rate``) and its ``ss_optimizer`` description, ``module.Class(key=value,...)``."""
    wanted = config.optimizer_type
    kind = wanted.lower()
    kwargs = dict(config.optimizer_args)
    lr: float | None = config.learning_rate
    named = _NAMED.get(kind)
    if named is None and kind.startswith("dadapt"):
        raise TrainingError(f"optimizer_type {wanted} is not a D-Adaptation optimizer kohya knows")
    if named is not None:
        optimizer_class = _import_class(wanted, *named, "optimizer_type")
    else:  # kohya: any class, a bare name from torch.optim
        optimizer_class = _custom_class(
            wanted, "torch.optim", _OPTIMIZER_PACKAGES, torch.optim.Optimizer, "optimizer_type"
        )

    if kind in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)  # kohya: Nesterov momentum needs a momentum
        kwargs["nesterov"] = True
    elif kind.startswith("dadapt") or kind == "prodigy":
        rates = {group["lr"] for group in groups} - {0.0}  # a group at 0 is frozen, not a second rate
        if kind in _ONE_LR and len(rates) > 1:
            raise TrainingError(
                f"optimizer {wanted} takes one learning rate: set unet_lr and text_encoder_lr equal (or one to 0), "
                f"got {', '.join(str(rate) for rate in sorted(rates))}"
            )
        if groups[0]["lr"] <= 0.1:
            warnings.append(
                f"optimizer {wanted}: learning rate {groups[0]['lr']} is low; D-Adaptation and Prodigy expect about 1.0"
            )
        if len(rates) > 1:
            warnings.append(f"optimizer {wanted}: unet_lr and text_encoder_lr scale one adapted step size")
    elif kind == "adafactor":
        kwargs.setdefault("relative_step", True)  # kohya's default
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            warnings.append("optimizer Adafactor: warmup_init=True needs relative_step, so relative_step=True is used")
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            # kohya: Adafactor computes its own step size; learning rates are dropped and its schedule is used
            warnings.append(
                "optimizer Adafactor with relative_step: learning_rate, unet_lr and text_encoder_lr are not used "
                "(Adafactor computes its step size; the adafactor schedule applies)"
            )
            groups = [{k: v for k, v in group.items() if k != "lr"} for group in groups]
            lr = None

    try:
        optimizer = optimizer_class(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"optimizer {wanted} rejected optimizer_args {config.optimizer_args}: {exc}") from exc
    if _is_schedule_free(config):
        optimizer.train()  # kohya: schedule-free optimizers start in train mode
    described = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    if kwargs:
        described += "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"
    return optimizer, described


@contextmanager
def _eval_weights(config: TrainingConfig, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The weights to save: a schedule-free optimizer trains on an extrapolated point and holds the averaged weights
    in eval mode, so kohya switches it to eval around every save."""
    switch = _is_schedule_free(config)
    if switch:
        optimizer.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if switch:
            optimizer.train()  # type: ignore[attr-defined]


class _NoSchedule:
    """kohya's dummy scheduler for schedule-free optimizers: the learning rate stays as given."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]


def _steps_of(value: int | float, steps: int) -> int:
    """kohya's ``int_or_float``: a float below 1 is a ratio of the training steps, anything else a step count."""
    return int(value * steps) if isinstance(value, float) and value < 1 else int(value)


def _lr_schedule(config: TrainingConfig, optimizer: torch.optim.Optimizer, steps: int, warnings: list[str]) -> Any:
    """kohya's ``get_scheduler_fix``: transformers' schedule functions (diffusers' for ``piecewise_constant``) with
    kohya's arguments; ``steps`` counts optimizer steps."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, Adafactor, AdafactorSchedule, SchedulerType

    name = config.lr_scheduler
    warmup = _steps_of(config.lr_warmup_steps, steps)
    decay = _steps_of(config.lr_decay_steps, steps)
    kwargs = dict(config.lr_scheduler_args)

    def no_warmup(schedule: str) -> None:  # kohya's wrap_check_needless_num_warmup_steps
        if warmup:
            raise TrainingError(f"lr_warmup_steps must be 0 with {schedule} (kohya refuses a warm-up it cannot apply)")

    def build(function: Any, **arguments: Any) -> Any:
        try:
            return function(optimizer, **arguments, **kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"lr_scheduler {config.lr_scheduler_type or name} cannot be built: {exc}") from exc

    if _is_schedule_free(config):
        if name != "constant" or warmup or config.lr_scheduler_type:
            warnings.append(f"lr_scheduler has no effect with {config.optimizer_type}: schedule-free uses none")
        return _NoSchedule(optimizer)
    if config.lr_scheduler_type:
        scheduler_class = _custom_class(
            config.lr_scheduler_type,
            "torch.optim.lr_scheduler",
            _SCHEDULER_PACKAGES,
            torch.optim.lr_scheduler.LRScheduler,
            "lr_scheduler_type",
        )
        no_warmup(f"lr_scheduler_type {config.lr_scheduler_type}")
        return build(scheduler_class)
    if type(optimizer) is Adafactor and optimizer.defaults["relative_step"]:
        if name not in ("adafactor", "constant"):
            warnings.append(f"lr_scheduler {name} is replaced by the adafactor schedule (Adafactor with relative_step)")
        no_warmup("Adafactor's relative_step schedule")
        return AdafactorSchedule(optimizer, config.learning_rate)
    if name == "adafactor":
        raise TrainingError('lr_scheduler adafactor needs optimizer_type "Adafactor" with relative_step=True')
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        if warmup:
            warnings.append("lr_warmup_steps has no effect with lr_scheduler piecewise_constant (use its step_rules)")
        return build(get_piecewise_constant_schedule)
    try:
        function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise TrainingError(f"lr_scheduler {name} is not provided by this worker's transformers") from None
    if name == "constant":
        no_warmup("lr_scheduler constant (use constant_with_warmup)")
        return build(function)
    if name == "constant_with_warmup":
        return build(function, num_warmup_steps=warmup)
    if name == "inverse_sqrt":
        return build(function, num_warmup_steps=warmup, timescale=config.lr_scheduler_timescale)
    if name == "cosine_with_restarts":
        return build(
            function, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=config.lr_scheduler_num_cycles
        )
    if name == "polynomial":
        return build(function, num_warmup_steps=warmup, num_training_steps=steps, power=config.lr_scheduler_power)
    if name == "cosine_with_min_lr":
        return build(
            function,
            num_warmup_steps=warmup,
            num_training_steps=steps,
            num_cycles=config.lr_scheduler_num_cycles / 2,
            min_lr_rate=config.lr_scheduler_min_lr_ratio,
        )
    if name in ("linear", "cosine"):
        return build(function, num_warmup_steps=warmup, num_training_steps=steps)
    if name == "warmup_stable_decay":
        return build(
            function,
            num_warmup_steps=warmup,
            num_stable_steps=steps - warmup - decay,
            num_decay_steps=decay,
            num_cycles=config.lr_scheduler_num_cycles / 2,
            min_lr_ratio=config.lr_scheduler_min_lr_ratio or 0.0,
        )
    return build(function, num_warmup_steps=warmup, num_training_steps=steps, num_decay_steps=decay)


class _HalfGradScaler(torch.amp.GradScaler):
    """kohya's ``patch_accelerator_for_fp16_training``: under ``full_fp16`` the gradients themselves are float16,
    which PyTorch's scaler refuses to unscale unless told to."""

    def _unscale_grads_(self, optimizer: Any, inv_scale: Any, found_inf: Any, allow_fp16: bool) -> Any:
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


@dataclass(frozen=True)
class _Precision:
    """Where each tensor lives: the frozen model in ``weight_dtype`` (kohya's ``prepare_dtype``) under autocast; the
    LoRA weights, their gradients and the optimizer state in ``train_dtype`` (float32, or the half type under
    ``full_fp16``/``full_bf16``). float16 needs a loss scaler."""

    device_type: str
    weight_dtype: torch.dtype
    train_dtype: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.weight_dtype != torch.float32

    def scaler(self) -> torch.amp.GradScaler | None:
        if self.weight_dtype != torch.float16:
            return None
        scaler_class = _HalfGradScaler if self.train_dtype == torch.float16 else torch.amp.GradScaler
        return scaler_class(self.device_type)

    def cast(self, params: list[torch.nn.Parameter]) -> None:
        """kohya's ``network.to(weight_dtype)`` under full_fp16/full_bf16 (before the optimizer creates state)."""
        for param in params:
            param.data = param.data.to(self.train_dtype)


def _precision(config: TrainingConfig, device: str) -> _Precision:
    """``mixed_precision`` on this device: float16/bfloat16 frozen weights with autocast, as kohya + accelerate."""
    device_type = torch.device(device).type
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    if dtype == torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision bf16 is not supported by this GPU")
    full = config.full_fp16 or config.full_bf16
    return _Precision(device_type, dtype, dtype if full else torch.float32)
