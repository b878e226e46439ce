"""kohya's optimizers, learning-rate schedules and training precision (train_util.get_optimizer, get_scheduler_fix,
train_network.py's full_fp16/full_bf16): each optimizer_type steps exactly like the class kohya builds, with kohya's
argument handling, and differently from AdamW; each lr_scheduler gives kohya's curve; a missing package fails the
job by name; full_bf16/full_fp16 train the LoRA itself in half precision. The optimizers and schedules are checked on
small tensors (bit-exact against a hand-built optimizer), then through `train` on the tiny model."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import bitsandbytes as bnb
import dadaptation
import dadaptation.experimental
import lion_pytorch
import prodigyopt
import schedulefree
import torch
from safetensors import safe_open
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers.optimization import Adafactor, AdafactorSchedule

from gpu_runtime.trainer import TrainingConfig, TrainingError, loop
from gpu_runtime.trainer.optim import _HalfGradScaler, _lr_schedule, _optimizer, _Precision
from tests.gpu_runtime.test_trainer import config_with, root, run  # noqa: F401 - root is the shared tiny-model fixture

LR = 0.04  # learning_rate: the optimizer's base lr (kohya passes it; the groups carry unet_lr / text_encoder_lr)


def _groups(unet_lr: float = 0.02, text_lr: float = 0.01) -> list[dict]:
    """Two parameter groups like the trainer's (UNet, text encoder); 64x64 reaches bitsandbytes' 8-bit state."""
    generator = torch.Generator().manual_seed(0)
    unet = [
        torch.nn.Parameter(torch.randn(64, 64, generator=generator)),
        torch.nn.Parameter(torch.randn(4, 64, generator=generator)),
    ]
    text = [torch.nn.Parameter(torch.randn(8, 16, generator=generator))]
    return [{"params": unet, "lr": unet_lr}, {"params": text, "lr": text_lr}]


def _train_steps(optimizer: torch.optim.Optimizer, groups: list[dict], steps: int = 6) -> torch.Tensor:
    """``steps`` optimizer steps with the same seeded gradients; all parameters flattened."""
    generator = torch.Generator().manual_seed(1)
    params = [p for group in groups for p in group["params"]]
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in params])


def _build(options: dict, groups: list[dict] | None = None) -> tuple[torch.optim.Optimizer, str, list[str], list]:
    config = TrainingConfig.from_dict({"learning_rate": LR, **options})
    groups = groups if groups is not None else _groups(*_rates(options))
    warnings: list[str] = []
    optimizer, name = _optimizer(config, groups, warnings)
    return optimizer, name, warnings, groups


def _rates(options: dict) -> tuple[float, float]:
    """The group learning rates: D-Adaptation and Prodigy take one (about 1.0)."""
    kind = options.get("optimizer_type", "").lower()
    return (1.0, 1.0) if kind.startswith("dadapt") or kind == "prodigy" else (0.02, 0.01)


def _adamw_result(rates: tuple[float, float]) -> torch.Tensor:
    groups = _groups(*rates)
    return _train_steps(torch.optim.AdamW(groups, lr=LR), groups)


def _initial() -> torch.Tensor:
    return torch.cat([p.detach().flatten() for group in _groups() for p in group["params"]])


def _strip_lr(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "lr"} for group in groups]


# optimizer config -> (the class kohya builds, how kohya calls it, ss_optimizer)
OPTIMIZERS = {
    "AdamW+args": (
        {"optimizer_type": "AdamW", "optimizer_args": ["weight_decay=0.1", "betas=(0.8,0.9)"]},
        torch.optim.AdamW,
        lambda g: torch.optim.AdamW(g, lr=LR, weight_decay=0.1, betas=(0.8, 0.9)),
        "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.8, 0.9))",
    ),
    "AdamW8bit": ({"optimizer_type": "AdamW8bit"}, bnb.optim.AdamW8bit, None, "bitsandbytes.optim.adamw.AdamW8bit"),
    "use_8bit_adam": ({"use_8bit_adam": True}, bnb.optim.AdamW8bit, None, "bitsandbytes.optim.adamw.AdamW8bit"),
    "PagedAdamW8bit": ({"optimizer_type": "PagedAdamW8bit"}, bnb.optim.PagedAdamW8bit, None, None),
    "PagedAdamW": ({"optimizer_type": "PagedAdamW"}, bnb.optim.PagedAdamW, None, None),
    "PagedAdamW32bit": ({"optimizer_type": "PagedAdamW32bit"}, bnb.optim.PagedAdamW32bit, None, None),
    "Lion8bit": ({"optimizer_type": "Lion8bit"}, bnb.optim.Lion8bit, None, None),
    "PagedLion8bit": ({"optimizer_type": "PagedLion8bit"}, bnb.optim.PagedLion8bit, None, None),
    "SGDNesterov8bit": (
        {"optimizer_type": "SGDNesterov8bit"},
        bnb.optim.SGD8bit,
        lambda g: bnb.optim.SGD8bit(g, lr=LR, momentum=0.9, nesterov=True),
        "bitsandbytes.optim.sgd.SGD8bit(momentum=0.9,nesterov=True)",
    ),
    "SGDNesterov": (
        {"optimizer_type": "sgdnesterov", "optimizer_args": ["momentum=0.5"]},
        torch.optim.SGD,
        lambda g: torch.optim.SGD(g, lr=LR, momentum=0.5, nesterov=True),
        "torch.optim.sgd.SGD(momentum=0.5,nesterov=True)",
    ),
    "Lion": ({"optimizer_type": "Lion"}, lion_pytorch.Lion, None, "lion_pytorch.lion_pytorch.Lion"),
    "use_lion_optimizer": ({"use_lion_optimizer": True}, lion_pytorch.Lion, None, None),
    "Prodigy": (
        {"optimizer_type": "Prodigy", "optimizer_args": ["d_coef=2", "decouple=True", "weight_decay=0.01"]},
        prodigyopt.Prodigy,
        lambda g: prodigyopt.Prodigy(g, lr=LR, d_coef=2, decouple=True, weight_decay=0.01),
        "prodigyopt.prodigy.Prodigy(d_coef=2,decouple=True,weight_decay=0.01)",
    ),
    "DAdaptation": ({"optimizer_type": "DAdaptation"}, dadaptation.experimental.DAdaptAdamPreprint, None, None),
    "DAdaptAdamPreprint": (
        {"optimizer_type": "DAdaptAdamPreprint"},
        dadaptation.experimental.DAdaptAdamPreprint,
        None,
        None,
    ),
    "DAdaptAdaGrad": ({"optimizer_type": "DAdaptAdaGrad"}, dadaptation.DAdaptAdaGrad, None, None),
    "DAdaptAdam": ({"optimizer_type": "DAdaptAdam"}, dadaptation.DAdaptAdam, None, None),
    "DAdaptAdan": ({"optimizer_type": "DAdaptAdan"}, dadaptation.DAdaptAdan, None, None),
    "DAdaptAdanIP": ({"optimizer_type": "DAdaptAdanIP"}, dadaptation.experimental.DAdaptAdanIP, None, None),
    "DAdaptLion": ({"optimizer_type": "DAdaptLion"}, dadaptation.DAdaptLion, None, None),
    "DAdaptSGD": ({"optimizer_type": "DAdaptSGD"}, dadaptation.DAdaptSGD, None, None),
    "Adafactor": (  # kohya: relative_step by default; the group learning rates are dropped, lr=None
        {"optimizer_type": "Adafactor", "lr_scheduler": "adafactor"},
        Adafactor,
        lambda g: Adafactor(_strip_lr(g), lr=None, relative_step=True),
        "transformers.optimization.Adafactor(relative_step=True)",
    ),
    "Adafactor-fixed-lr": (
        {
            "optimizer_type": "Adafactor",
            "optimizer_args": ["relative_step=False", "scale_parameter=False", "warmup_init=False"],
        },
        Adafactor,
        lambda g: Adafactor(g, lr=LR, relative_step=False, scale_parameter=False, warmup_init=False),
        None,
    ),
    "AdamWScheduleFree": ({"optimizer_type": "AdamWScheduleFree"}, schedulefree.AdamWScheduleFree, None, None),
    "RAdamScheduleFree": ({"optimizer_type": "RAdamScheduleFree"}, schedulefree.RAdamScheduleFree, None, None),
    "SGDScheduleFree": ({"optimizer_type": "SGDScheduleFree"}, schedulefree.SGDScheduleFree, None, None),
    "bare torch.optim name": ({"optimizer_type": "RAdam"}, torch.optim.RAdam, None, "torch.optim.radam.RAdam"),
    "dotted torch class": ({"optimizer_type": "torch.optim.NAdam"}, torch.optim.NAdam, None, None),
    "dotted package class": (
        {"optimizer_type": "bitsandbytes.optim.AdEMAMix8bit"},
        bnb.optim.AdEMAMix8bit,
        None,
        "bitsandbytes.optim.ademamix.AdEMAMix8bit",
    ),
}


@pytest.mark.parametrize("case", OPTIMIZERS)
def test_each_optimizer_type_steps_exactly_like_the_class_kohya_builds(case):
    options, expected_class, reference, description = OPTIMIZERS[case]
    optimizer, name, _, groups = _build(options)
    assert type(optimizer) is expected_class
    assert name == description or (description is None and name.startswith(expected_class.__module__))
    result = _train_steps(optimizer, groups)

    reference_groups = _groups(*_rates(options))
    # kohya: optimizer_class(trainable_params, lr=args.learning_rate, **optimizer_kwargs)
    hand = expected_class(reference_groups, lr=LR) if reference is None else reference(reference_groups)
    if case.endswith("ScheduleFree"):
        hand.train()  # kohya starts schedule-free optimizers in train mode
    assert torch.equal(result, _train_steps(hand, reference_groups))
    assert not torch.equal(result, _initial()) and not torch.equal(result, _adamw_result(_rates(options)))


def test_kohyas_argument_rules_and_advice():
    # Adafactor: warmup_init needs relative_step, which kohya then switches on
    optimizer, _, warnings, _ = _build(
        {"optimizer_type": "Adafactor", "optimizer_args": ["relative_step=False", "warmup_init=True"]}
    )
    assert optimizer.defaults["relative_step"] is True and optimizer.defaults["lr"] is None
    assert [group.get("lr") for group in optimizer.param_groups] == [None, None]
    assert any("warmup_init=True needs relative_step" in w for w in warnings)
    assert any("learning_rate, unet_lr and text_encoder_lr are not used" in w for w in warnings)
    # D-Adaptation / Prodigy: kohya's advice on a low learning rate and on several learning rates
    _, _, warnings, _ = _build({"optimizer_type": "DAdaptAdan"}, _groups(0.02, 0.01))
    assert any("learning rate 0.02 is low" in w for w in warnings)
    assert any("unet_lr and text_encoder_lr scale one adapted step size" in w for w in warnings)
    _, _, warnings, _ = _build({"optimizer_type": "DAdaptAdam"}, _groups(1.0, 0.0))  # a group at 0 is allowed
    assert not warnings
    # the classes that raise on their first step with several learning rates are refused at the start
    classes = {
        "DAdaptation": dadaptation.experimental.DAdaptAdamPreprint,
        "DAdaptAdamPreprint": dadaptation.experimental.DAdaptAdamPreprint,
        "DAdaptAdam": dadaptation.DAdaptAdam,
        "DAdaptLion": dadaptation.DAdaptLion,
        "DAdaptSGD": dadaptation.DAdaptSGD,
        "Prodigy": prodigyopt.Prodigy,
        "DAdaptAdaGrad": dadaptation.DAdaptAdaGrad,
        "DAdaptAdan": dadaptation.DAdaptAdan,
        "DAdaptAdanIP": dadaptation.experimental.DAdaptAdanIP,
    }
    for optimizer_type, optimizer_class in classes.items():
        groups = _groups(1.0, 0.5)
        try:
            _train_steps(optimizer_class(groups, lr=1.0), groups, steps=1)
            raises = False
        except RuntimeError as exc:
            raises = "different lr values in different parameter groups" in str(exc)
        try:
            _build({"optimizer_type": optimizer_type}, _groups(1.0, 0.5))
            refused = False
        except TrainingError as exc:
            refused = (
                "takes one learning rate: set unet_lr and text_encoder_lr equal (or one to 0), got 0.5, 1.0" in str(exc)
            )
        assert raises == refused, optimizer_type
        assert refused == (optimizer_type not in ("DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP")), optimizer_type
    # the optimizer's base lr is learning_rate (transformers' polynomial schedule decays from it)
    assert _build({})[0].defaults["lr"] == LR


def _hide(monkeypatch, package: str) -> None:
    """Make ``package`` (and its loaded submodules) unimportable, as on a worker without it."""
    for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")] + [package]:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("optimizer_type", "module", "package"),
    [
        ("Lion", "lion_pytorch", "lion-pytorch"),
        ("AdamW8bit", "bitsandbytes", "bitsandbytes"),
        ("PagedLion8bit", "bitsandbytes", "bitsandbytes"),
        ("Prodigy", "prodigyopt", "prodigyopt"),
        ("DAdaptAdam", "dadaptation", "dadaptation"),
        ("DAdaptation", "dadaptation", "dadaptation"),
        ("SGDScheduleFree", "schedulefree", "schedulefree"),
        ("bitsandbytes.optim.AdEMAMix8bit", "bitsandbytes", "bitsandbytes"),
    ],
)
def test_a_missing_optimizer_package_fails_with_its_name(monkeypatch, optimizer_type, module, package):
    _hide(monkeypatch, module)
    with pytest.raises(TrainingError, match=f"optimizer_type {optimizer_type} needs the {package} package"):
        _build({"optimizer_type": optimizer_type})


def test_optimizers_that_cannot_be_provided_are_refused_by_name(monkeypatch):
    for optimizer_type, message in (
        ("os.system", "optimizer_type os.system is not supported: classes are imported only from"),
        ("torch.nn.Linear", "optimizer_type torch.nn.Linear is not a torch.optim.optimizer.Optimizer class"),
        ("torch.optim.Nope", "optimizer_type torch.optim.Nope: torch.optim has no Nope"),
        ("AdEMAMix8bit", "optimizer_type AdEMAMix8bit: torch.optim has no AdEMAMix8bit"),  # kohya: full path needed
        ("DAdaptFoo", "optimizer_type DAdaptFoo is not a D-Adaptation optimizer kohya knows"),
    ):
        with pytest.raises(TrainingError, match=message):
            _build({"optimizer_type": optimizer_type})
    with pytest.raises(TrainingError, match="optimizer AdamW rejected optimizer_args"):
        _build({"optimizer_args": ["betas=0.9"]})

    class Broken(types.ModuleType):  # bitsandbytes whose native library cannot load on this host
        def __getattr__(self, name):
            raise RuntimeError("no native library for this device")

    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", Broken("bitsandbytes.optim"))
    with pytest.raises(TrainingError, match=r"AdamW8bit: the bitsandbytes package cannot run here \(no native library"):
        _build({"optimizer_type": "AdamW8bit"})

    for options, message in (
        ({"optimizer_args": ["decouple=true"]}, "the value of decouple must be a Python literal"),
        ({"use_8bit_adam": True, "optimizer_type": "Lion"}, "use_8bit_adam and optimizer_type 'Lion' cannot both"),
        ({"use_8bit_adam": True, "use_lion_optimizer": True}, "cannot both be true"),
    ):
        with pytest.raises(TrainingError, match=message):
            TrainingConfig.from_dict(options)


# --- learning-rate schedules -------------------------------------------------------------------------------------

STEPS = 10


def _curve(options: dict) -> list[float]:
    """The group learning rates at steps 0..STEPS-1 (unet_lr 0.02, text_encoder_lr 0.01, learning_rate 0.04),
    flattened: [unet at 0, text at 0, unet at 1, ...]."""
    config = TrainingConfig.from_dict({"learning_rate": LR, **options})
    optimizer = torch.optim.AdamW(_groups(), lr=LR)
    schedule = _lr_schedule(config, optimizer, STEPS, [])
    lrs = []
    for _ in range(STEPS):
        lrs += [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        schedule.step()
    return lrs


def _hand(factor) -> list[float]:
    """Hand values of a schedule's factor, for both groups, as :func:`_curve` lists them."""
    return [rate * factor(step) for step in range(STEPS) for rate in (0.02, 0.01)]


@pytest.mark.parametrize(
    ("options", "diffusers_kwargs"),
    [
        ({"lr_scheduler": "constant"}, {}),
        ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 3}, {"num_warmup_steps": 3}),
        ({"lr_scheduler": "linear", "lr_warmup_steps": 0.2}, {"num_warmup_steps": 2}),  # a ratio below 1
        ({"lr_scheduler": "cosine", "lr_warmup_steps": "30%"}, {"num_warmup_steps": 3}),
        (
            {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 3},
            {"num_cycles": 3, "num_warmup_steps": 0},
        ),
        (
            {"lr_scheduler": "polynomial", "lr_scheduler_power": 2, "lr_warmup_steps": 1},
            {"power": 2.0, "num_warmup_steps": 1},
        ),
    ],
)
def test_diffusers_schedules_give_the_same_curve(options, diffusers_kwargs):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(_groups(), lr=LR)
    schedule = get_scheduler(options["lr_scheduler"], optimizer, num_training_steps=STEPS, **diffusers_kwargs)
    expected = []
    for _ in range(STEPS):
        expected += [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        schedule.step()
    assert _curve(options) == expected


def test_schedules_follow_kohyas_formulas():
    approx = pytest.approx
    # warm-up then linear decay over the remaining steps
    linear = _curve({"lr_scheduler": "linear", "lr_warmup_steps": 2})
    assert linear == approx(_hand(lambda s: s / 2 if s < 2 else (STEPS - s) / (STEPS - 2)), rel=1e-12)
    # cosine with restarts: 2 hard restarts over the 10 steps
    restarts = _curve({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2})
    assert restarts == approx(_hand(lambda s: 0.5 * (1 + math.cos(math.pi * ((2 * s / STEPS) % 1)))), rel=1e-12)
    # polynomial decays from learning_rate (the optimizer's base lr, 0.04) to 1e-7, scaling each group's rate
    poly = _curve({"lr_scheduler": "polynomial", "lr_scheduler_power": 2})
    assert poly == approx(_hand(lambda s: ((LR - 1e-7) * (1 - s / STEPS) ** 2 + 1e-7) / LR), rel=1e-12)
    # inverse_sqrt with lr_scheduler_timescale
    inverse = _curve({"lr_scheduler": "inverse_sqrt", "lr_warmup_steps": 2, "lr_scheduler_timescale": 4})
    assert inverse == approx(_hand(lambda s: s / 2 if s < 2 else 1 / math.sqrt((s + 4 - 2) / 4)), rel=1e-12)
    # cosine_with_min_lr: kohya passes num_cycles / 2 and lr_scheduler_min_lr_ratio
    min_lr = _curve({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1})
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * 0.5 * 2 * s / STEPS))  # noqa: E731
    assert min_lr == approx(_hand(lambda s: 0.1 + 0.9 * cosine(s)), rel=1e-12)
    # warmup_stable_decay: 2 warm-up, 5 stable, 3 decay steps (lr_decay_steps as a ratio), floor 0.1
    wsd = _curve(
        {
            "lr_scheduler": "warmup_stable_decay",
            "lr_warmup_steps": 2,
            "lr_decay_steps": 0.3,
            "lr_scheduler_min_lr_ratio": 0.1,
        }
    )

    def wsd_factor(s: int) -> float:
        if s < 2:
            return 0.1 + 0.9 * s / 2
        if s < 7:
            return 1.0
        progress = (s - 7) / 3
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    assert wsd == approx(_hand(wsd_factor), rel=1e-12)
    # diffusers' piecewise_constant with lr_scheduler_args step_rules
    piecewise = _curve({"lr_scheduler": "piecewise_constant", "lr_scheduler_args": ["step_rules='1:3,0.5:6,0.1'"]})
    assert piecewise == _hand(lambda s: 1 if s < 3 else 0.5 if s < 6 else 0.1)
    # lr_scheduler_type: any scheduler class (a bare name is from torch.optim.lr_scheduler) with lr_scheduler_args
    step_lr = _curve({"lr_scheduler_type": "StepLR", "lr_scheduler_args": ["step_size=3", "gamma=0.5"]})
    assert step_lr == _hand(lambda s: 0.5 ** (s // 3))
    exponential = _curve(
        {"lr_scheduler_type": "torch.optim.lr_scheduler.ExponentialLR", "lr_scheduler_args": "gamma=0.9"}
    )
    assert exponential == approx(_hand(lambda s: 0.9**s), rel=1e-12)


def test_adafactor_and_schedule_free_use_their_own_schedules():
    optimizer, _, _, _ = _build({"optimizer_type": "Adafactor", "lr_scheduler": "cosine"})
    config = TrainingConfig.from_dict({"optimizer_type": "Adafactor", "lr_scheduler": "cosine", "learning_rate": LR})
    warnings: list[str] = []
    schedule = _lr_schedule(config, optimizer, STEPS, warnings)
    assert type(schedule) is AdafactorSchedule and schedule.get_last_lr() == [LR, LR]  # initial_lr: learning_rate
    assert any("lr_scheduler cosine is replaced by the adafactor schedule" in w for w in warnings)

    # schedule-free: kohya's dummy scheduler, the learning rates stay as given
    config = TrainingConfig.from_dict({"optimizer_type": "AdamWScheduleFree", "lr_scheduler": "cosine"})
    optimizer, _, _, _ = _build({"optimizer_type": "AdamWScheduleFree"})
    warnings = []
    schedule = _lr_schedule(config, optimizer, STEPS, warnings)
    for _ in range(3):
        schedule.step()
    assert schedule.get_last_lr() == [group["lr"] for group in optimizer.param_groups] == [0.02, 0.01]
    assert warnings == ["lr_scheduler has no effect with AdamWScheduleFree: schedule-free uses none"]


def test_schedules_kohya_refuses_are_errors():
    for options, message in (
        ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler 'cosine_annealing' is not supported; kohya's choices"),
        ({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler 'reduce_lr_on_plateau' is not supported"),
        ({"lr_scheduler": "constant", "lr_warmup_steps": 5}, "lr_warmup_steps must be 0 with lr_scheduler constant"),
        ({"lr_scheduler_type": "StepLR", "lr_warmup_steps": 0.1}, "lr_warmup_steps must be 0 with lr_scheduler_type"),
        ({"optimizer_type": "Adafactor", "lr_warmup_steps": 2}, "must be 0 with Adafactor's relative_step schedule"),
        ({"lr_scheduler": "adafactor"}, 'lr_scheduler adafactor needs optimizer_type "Adafactor"'),
        ({"lr_warmup_steps": 2.5}, "lr_warmup_steps must be a whole number of steps or a ratio below 1"),
        ({"lr_scheduler_args": ["T_max=abc"]}, "lr_scheduler_args: the value of T_max must be a Python literal"),
    ):
        with pytest.raises(TrainingError, match=message):
            TrainingConfig.from_dict(options)
    for options, message in (
        ({"lr_scheduler_type": "os.path.join"}, "lr_scheduler_type os.path.join is not supported"),
        ({"lr_scheduler_type": "torch.optim.AdamW"}, "is not a torch.optim.lr_scheduler.LRScheduler class"),
        ({"lr_scheduler_type": "StepLR"}, "lr_scheduler StepLR cannot be built"),  # step_size is required
        ({"lr_scheduler": "cosine_with_min_lr"}, "lr_scheduler cosine_with_min_lr cannot be built"),  # no min lr
    ):
        with pytest.raises(TrainingError, match=message):
            _curve(options)


# --- through the trainer on the tiny model -----------------------------------------------------------------------


def _lora(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        keys = handle.keys()
        return {k: handle.get_tensor(k) for k in keys if not k.endswith(".alpha")}


def _e2e(tmp_path: Path, name: str, **overrides) -> Path:
    return config_with(
        tmp_path,
        name=f"{name}.toml",
        max_train_epochs=None,
        max_train_steps=2,
        save_every_n_epochs=None,
        save_precision="float",
        lr_scheduler="constant",
        **overrides,
    )


@pytest.fixture()
def stepped(monkeypatch):
    """Every optimizer step the trainer takes: (optimizer, {(param dtype, grad dtype)})."""
    seen: list[tuple[torch.optim.Optimizer, set]] = []

    def hook(optimizer, args, kwargs):
        dtypes = {(p.dtype, p.grad.dtype) for g in optimizer.param_groups for p in g["params"] if p.grad is not None}
        seen.append((optimizer, dtypes))

    handle = register_optimizer_step_pre_hook(hook)
    yield seen
    handle.remove()


def test_optimizers_train_the_lora_differently_and_schedule_free_saves_its_eval_weights(
    root,  # noqa: F811
    tmp_path,
    stepped,
    monkeypatch,
):
    saves = []  # at every save: the optimizer's modes and its weights
    from gpu_runtime.trainer.lora import LoRANetwork

    state_dict = LoRANetwork.kohya_state_dict

    def spy(self, *args):
        optimizer = stepped[-1][0]
        weights = {p.detach().numpy().tobytes() for g in optimizer.param_groups for p in g["params"]}
        saves.append(([g.get("train_mode") for g in optimizer.param_groups], weights))
        return state_dict(self, *args)

    monkeypatch.setattr(LoRANetwork, "kohya_state_dict", spy)
    adamw = run(root, tmp_path / "adamw", _e2e(tmp_path, "adamw"))
    results = {"AdamW": _lora(adamw.files[-1])}
    for optimizer_type, package in (("AdamW8bit", "bitsandbytes"), ("AdamWScheduleFree", "schedulefree")):
        result = run(root, tmp_path / optimizer_type, _e2e(tmp_path, optimizer_type, optimizer_type=optimizer_type))
        with safe_open(str(result.files[-1]), "pt") as handle:
            assert handle.metadata()["ss_optimizer"].startswith(f"{package}.")
        results[optimizer_type] = _lora(result.files[-1])
    ups = {
        name: torch.cat([t.flatten() for k, t in sorted(lora.items()) if "lora_up" in k])
        for name, lora in results.items()
    }
    assert all(up.abs().sum() > 0 for up in ups.values())  # every optimizer trained the zero-initialised up weights
    assert not torch.equal(ups["AdamW"], ups["AdamW8bit"]) and not torch.equal(ups["AdamW"], ups["AdamWScheduleFree"])

    # schedule-free: the file holds the optimizer's eval (averaged) weights, not the train-mode point
    optimizer = stepped[-1][0]
    assert type(optimizer) is schedulefree.AdamWScheduleFree
    modes, weights = saves[-1]
    assert modes == [False, False] and [g["train_mode"] for g in optimizer.param_groups] == [True, True]
    saved = {t.numpy().tobytes() for t in results["AdamWScheduleFree"].values()}
    train_mode = {p.detach().numpy().tobytes() for g in optimizer.param_groups for p in g["params"]}
    assert saved == weights and saved != train_mode
    assert saves[0][0] == [None, None]  # AdamW has no modes


def test_full_bf16_and_full_fp16_train_the_lora_in_half_precision(root, tmp_path, stepped, monkeypatch):  # noqa: F811
    models = []
    load = loop._load_model
    monkeypatch.setattr(loop, "_load_model", lambda *args: models.append(load(*args)) or models[-1])
    scalers = []
    scaler_of = _Precision.scaler
    monkeypatch.setattr(_Precision, "scaler", lambda self: scalers.append(scaler_of(self)) or scalers[-1])

    mixed = run(root, tmp_path / "bf16", _e2e(tmp_path, "bf16", mixed_precision="bf16"))
    assert models[-1].unet.dtype == torch.bfloat16 and stepped[-1][1] == {(torch.float32, torch.float32)}
    full = run(root, tmp_path / "full", _e2e(tmp_path, "full", mixed_precision="bf16", full_bf16=True))
    assert models[-1].unet.dtype == torch.bfloat16 and stepped[-1][1] == {(torch.bfloat16, torch.bfloat16)}
    assert models[-1].text_encoders[0].dtype == torch.bfloat16
    mixed_up, full_up = (
        torch.cat([t.flatten() for k, t in sorted(_lora(r.files[-1]).items()) if "lora_up" in k]) for r in (mixed, full)
    )
    assert full_up.abs().sum() > 0 and not torch.equal(mixed_up, full_up)
    with safe_open(str(full.files[-1]), "pt") as handle:
        assert handle.metadata()["ss_mixed_precision"] == "bf16" and handle.metadata()["ss_full_fp16"] == "False"
        keys = handle.keys()
        assert {handle.get_tensor(k).dtype for k in keys} == {torch.float32}  # save_precision float

    # full_fp16: float16 gradients through kohya's patched loss scaler (PyTorch's refuses to unscale them)
    config = _e2e(tmp_path, "fp16", mixed_precision="fp16", full_fp16=True, optimizer_type="AdamW8bit")
    result = run(root, tmp_path / "fp16", config)
    assert models[-1].unet.dtype == torch.float16 and stepped[-1][1] == {(torch.float16, torch.float16)}
    assert scalers[:2] == [None, None] and type(scalers[2]) is _HalfGradScaler and math.isfinite(result.loss)
    assert torch.cat([t.flatten() for k, t in _lora(result.files[-1]).items() if "lora_up" in k]).abs().sum() > 0
    with safe_open(str(result.files[-1]), "pt") as handle:
        assert handle.metadata()["ss_full_fp16"] == "True"
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler, param = torch.amp.GradScaler("cpu"), torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
        scaler.scale(param.sum()).backward()
        scaler.unscale_(torch.optim.SGD([param], lr=1.0))

    for options, message in (
        ({"full_bf16": True}, "full_bf16 requires mixed_precision = 'bf16', got 'no'"),
        ({"full_fp16": True, "mixed_precision": "bf16"}, "full_fp16 requires mixed_precision = 'fp16', got 'bf16'"),
        ({"full_fp16": True, "full_bf16": True, "mixed_precision": "fp16"}, "cannot both be true"),
    ):
        with pytest.raises(TrainingError, match=message):
            TrainingConfig.from_dict(options)


def test_a_missing_optimizer_package_fails_the_job_before_training(root, tmp_path, monkeypatch, stepped):  # noqa: F811
    _hide(monkeypatch, "lion_pytorch")
    with pytest.raises(TrainingError, match="optimizer_type Lion needs the lion-pytorch package"):
        run(root, tmp_path, _e2e(tmp_path, "lion", optimizer_type="Lion", learning_rate=1e-4))
    assert not stepped and (not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()))


def test_a_group_at_learning_rate_0_is_left_out_as_kohya_does(root, tmp_path, stepped):  # noqa: F811
    """Adafactor's relative step ignores learning rates: only leaving the text encoder's group out of the optimizer
    keeps its LoRA untrained with ``text_encoder_lr = 0``, as kohya's "NO LR skipping" does."""
    config = _e2e(tmp_path, "frozen", optimizer_type="Adafactor", text_encoder_lr=0)
    lora = _lora(run(root, tmp_path / "frozen", config).files[-1])
    text_ups = [t for k, t in lora.items() if k.startswith("lora_te_") and "lora_up" in k]
    unet_ups = [t for k, t in lora.items() if k.startswith("lora_unet_") and "lora_up" in k]
    assert text_ups and all(not t.any() for t in text_ups)  # zero-initialised, never stepped
    assert any(t.any() for t in unet_ups)
    assert len(stepped[-1][0].param_groups) == 1
    with pytest.raises(TrainingError, match="every learning rate is 0"):
        run(root, tmp_path / "none", _e2e(tmp_path, "none", unet_lr=0, text_encoder_lr=0))
