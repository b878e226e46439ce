"""kohya's noise, timestep and loss options of the training step: each tensor function against values worked out by
hand from kohya's formulas (custom_train_functions.py, train_util.py), kohya's checks, and tiny trainings that show
each option changes the trained LoRA while every option at its neutral value trains exactly the default LoRA."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from gpu_runtime.trainer import TrainingConfig, TrainingError, train
from gpu_runtime.trainer import loop as trainer_loop
from gpu_runtime.trainer.losses import (
    debiased_weight,
    elementwise_loss,
    huber_threshold,
    min_snr_weight,
    step_loss,
    v_prediction_scale,
    weight_per_sample,
)
from gpu_runtime.trainer.noise import (
    enforce_zero_terminal_snr,
    noisy_latents,
    offset_noise,
    pyramid_noise,
    sample_timesteps,
    snr_table,
    zero_terminal_snr_betas,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(actual: torch.Tensor, expected: list | torch.Tensor, tol: float = 1e-6) -> bool:
    return torch.allclose(actual.double(), torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


def sd_scheduler():
    import diffusers

    return diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# --- noise ------------------------------------------------------------------------------------------------------


def test_noise_offset_adds_offset_times_one_normal_per_sample_and_channel():
    noise = torch.randn(2, 3, 4, 4, generator=gen(1))
    latents = torch.zeros(2, 3, 4, 4)
    z = torch.randn(2, 3, 1, 1, generator=gen(0))  # what offset_noise draws from gen(0)
    out = offset_noise(noise, latents, 0.1, gen(0))
    assert torch.equal(out, noise + 0.1 * z)
    shift = out - noise  # constant over the image, one value per (sample, channel)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-7) and shift.abs().min() > 0

    # adaptive: offset + scale * |channel mean| (clamped at 0): channel means of 2, -4 and 0
    latents = torch.stack([torch.full((4, 4), 2.0), torch.full((4, 4), -4.0), torch.zeros(4, 4)])[None].repeat(
        2, 1, 1, 1
    )
    out = offset_noise(noise, latents, 0.1, gen(0), adaptive_scale=0.5)
    assert close(out - noise, torch.tensor([1.1, 2.1, 0.1]).view(1, 3, 1, 1) * z)
    out = offset_noise(noise, latents, 0.1, gen(0), adaptive_scale=-0.5)  # 0.1 - 1 and 0.1 - 2 clamp to 0
    assert close(out - noise, torch.tensor([0.0, 0.0, 0.1]).view(1, 3, 1, 1) * z)


def test_pyramid_noise_levels_discount_and_unit_std():
    noise = torch.randn(2, 3, 4, 4, generator=gen(1))
    # gen(0) draws: r0, the 4x4 level, r1 in [2, 4), so int(4 / r1) = 1: a 1x1 level (upsampled = constant) and stop
    replay = gen(0)
    torch.rand(1, generator=replay)
    level0 = torch.randn(2, 3, 4, 4, generator=replay)
    r1 = float(torch.rand(1, generator=replay)) * 2 + 2
    level1 = torch.randn(2, 3, 1, 1, generator=replay)
    assert r1 > 2
    for discount in (0.3, 0.0):
        out = pyramid_noise(noise, gen(0), iterations=6, discount=discount)
        total = noise + level0 + discount * level1
        assert close(out, total / total.std()) and out.shape == noise.shape
        assert abs(float(out.std()) - 1) < 1e-6
    one = pyramid_noise(noise, gen(0), iterations=1, discount=0.3)
    assert close(one, (noise + level0) / (noise + level0).std())
    big = pyramid_noise(torch.randn(1, 4, 32, 24, generator=gen(2)), gen(0), iterations=10, discount=0.3)
    assert big.shape == (1, 4, 32, 24) and abs(float(big.std()) - 1) < 1e-6


def test_timesteps_range_or_constant():
    drawn = sample_timesteps(10, 20, 64, gen(0))
    assert torch.equal(drawn, torch.randint(10, 20, (64,), generator=gen(0)))
    assert drawn.min() >= 10 and drawn.max() <= 19 and drawn.dtype == torch.long
    g = gen(0)
    assert torch.equal(sample_timesteps(500, 500, 3, g), torch.tensor([500, 500, 500]))
    assert torch.equal(g.get_state(), gen(0).get_state())  # a constant timestep draws nothing


class _Config:
    """The noise fields of a TrainingConfig, all off."""

    noise_offset = 0.0
    noise_offset_random_strength = False
    adaptive_noise_scale = None
    multires_noise_iterations = None
    multires_noise_discount = 0.3
    ip_noise_gamma = None
    ip_noise_gamma_random_strength = False
    min_timestep = 0


def _noisy(**fields):
    config = _Config()
    for key, value in fields.items():
        setattr(config, key, value)
    latents = torch.randn(2, 4, 8, 8, generator=gen(5))
    return latents, noisy_latents(config, sd_scheduler(), latents, gen(0), 1000)


def test_noisy_latents_draw_in_kohyas_order():
    scheduler = sd_scheduler()
    latents, (noise, noisy, t) = _noisy()
    replay = gen(0)
    base = torch.randn(2, 4, 8, 8, generator=replay)
    assert torch.equal(noise, base) and torch.equal(t, torch.randint(0, 1000, (2,), generator=replay))
    assert torch.equal(noisy, scheduler.add_noise(latents, base, t))

    # noise_offset_random_strength: a uniform strength in [0, offset) drawn before the offset noise
    _, (noise, _, t2) = _noisy(noise_offset=0.2, noise_offset_random_strength=True)
    replay = gen(0)
    base = torch.randn(2, 4, 8, 8, generator=replay)
    strength = torch.rand(1, generator=replay) * 0.2
    assert torch.equal(noise, base + strength * torch.randn(2, 4, 1, 1, generator=replay))
    assert 0 <= float(strength) < 0.2 and torch.equal(t2, torch.randint(0, 1000, (2,), generator=replay))

    # ip_noise_gamma perturbs what is added to the latents, not the target; drawn after the timesteps
    latents, (noise, noisy, t) = _noisy(ip_noise_gamma=0.1)
    replay = gen(0)
    base = torch.randn(2, 4, 8, 8, generator=replay)
    t_replay = torch.randint(0, 1000, (2,), generator=replay)
    perturbation = torch.randn(2, 4, 8, 8, generator=replay)
    assert torch.equal(noise, base) and torch.equal(t, t_replay)
    assert torch.equal(noisy, scheduler.add_noise(latents, base + 0.1 * perturbation, t))
    _, (noise_r, noisy_r, _) = _noisy(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    assert torch.equal(noise_r, base) and not torch.equal(noisy_r, noisy)

    # multi-resolution noise replaces the target noise; the timesteps follow its draws
    _, (noise_m, _, _) = _noisy(multires_noise_iterations=3, multires_noise_discount=0.5)
    assert noise_m.shape == base.shape and abs(float(noise_m.std()) - 1) < 1e-6 and not torch.equal(noise_m, base)


# --- schedule ---------------------------------------------------------------------------------------------------


def test_snr_table_and_zero_terminal_snr():
    assert close(snr_table(torch.tensor([0.5, 0.8, 0.2])), [1.0, 4.0, 0.25])

    # betas 0.1, 0.2, 0.3: alpha_bar 0.9, 0.72, 0.504; sqrt shifted by the last, scaled to keep the first
    s = [math.sqrt(0.9), math.sqrt(0.72), math.sqrt(0.504)]
    scaled = [(v - s[2]) * s[0] / (s[0] - s[2]) for v in s]
    bar = [v * v for v in scaled]
    expected = [1 - bar[0], 1 - bar[1] / bar[0], 1 - bar[2] / bar[1]]
    betas = zero_terminal_snr_betas(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert close(betas, expected, 1e-12) and betas[-1] == 1.0

    scheduler = sd_scheduler()
    before = scheduler.alphas_cumprod.clone()
    enforce_zero_terminal_snr(scheduler)
    after = scheduler.alphas_cumprod
    assert after[-1] == 0.0 and before[-1] > 0  # the last timestep is pure noise
    assert abs(float(after[0] - before[0])) < 1e-6 and bool((after[1:] < after[:-1]).all())
    assert torch.equal(scheduler.alphas, 1 - scheduler.betas)
    latents, noise = torch.randn(1, 4, 2, 2, generator=gen(1)), torch.randn(1, 4, 2, 2, generator=gen(2))
    last = torch.tensor([999])
    assert torch.equal(scheduler.add_noise(latents, noise, last), noise)
    assert torch.equal(scheduler.get_velocity(latents, noise, last), -latents)


# --- loss -------------------------------------------------------------------------------------------------------


def test_elementwise_losses_and_huber_at_a_known_c():
    prediction, target = torch.tensor([[0.0, 1.2, -1.2]]), torch.zeros(1, 3)
    c = torch.tensor([0.5])
    assert close(elementwise_loss(prediction, target, "l2"), [[0.0, 1.44, 1.44]])
    assert close(elementwise_loss(prediction, target, "l1"), [[0.0, 1.2, 1.2]])
    # 2c(sqrt(d^2 + c^2) - c) with sqrt(1.44 + 0.25) = 1.3
    assert close(elementwise_loss(prediction, target, "huber", c), [[0.0, 0.8, 0.8]])
    assert close(elementwise_loss(prediction, target, "smooth_l1", c), [[0.0, 1.6, 1.6]])
    # per-sample c broadcasts over the other dims
    two = elementwise_loss(torch.full((2, 1, 1, 1), 1.2), torch.zeros(2, 1, 1, 1), "huber", torch.tensor([0.5, 1.6]))
    assert close(two.flatten(), [0.8, 2 * 1.6 * (2.0 - 1.6)])


def test_huber_schedules():
    t = torch.tensor([0, 500, 1000])
    alphas = torch.ones(1001)
    assert close(huber_threshold("constant", 0.1, 2.0, t, alphas, 1000), [0.2, 0.2, 0.2])
    assert close(huber_threshold("exponential", 0.1, 2.0, t, alphas, 1000), [2.0, 2 * math.sqrt(0.1), 0.2])
    # snr: (1 - c) / (1 + sigma)^2 + c, sigma = sqrt((1 - a) / a): a = 1 -> 1, a = 0.8 -> 0.5, a = 0 -> c
    alphas = torch.tensor([1.0, 0.8, 0.0])
    assert close(huber_threshold("snr", 0.1, 2.0, torch.tensor([0, 1, 2]), alphas, 3), [1.0, 0.5, 0.1])


def test_snr_weights():
    snr = torch.tensor([1.0, 4.0, 25.0])
    assert close(min_snr_weight(snr, 5.0, v_prediction=False), [1.0, 1.0, 0.2])
    assert close(min_snr_weight(snr, 5.0, v_prediction=True), [0.5, 0.8, 5 / 26])
    capped = torch.tensor([4.0, 2000.0])  # kohya caps the SNR at 1000
    assert close(debiased_weight(capped, v_prediction=False), [0.5, 1 / math.sqrt(1000)])
    assert close(debiased_weight(capped, v_prediction=True), [0.2, 1 / 1001])
    assert close(v_prediction_scale(torch.tensor([1.0, 3.0, 5000.0])), [0.5, 0.75, 1000 / 1001])


def test_per_sample_weights_in_kohyas_order():
    config = TrainingConfig.from_dict({})
    loss, snr = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 25.0])
    assert torch.equal(weight_per_sample(loss, snr, config, False), loss)
    config.v_pred_like_loss = 0.1  # loss + loss / (snr / (snr + 1)) * 0.1
    assert close(weight_per_sample(loss, snr, config, False), [2 + 2 / 0.5 * 0.1, 2 + 2 / (25 / 26) * 0.1])
    config = TrainingConfig.from_dict({"min_snr_gamma": 5, "debiased_estimation_loss": True})
    # min-SNR first (1, 0.2), then debiased (1 / sqrt(snr)): 2 * 1 * 1, 2 * 0.2 / 5
    assert close(weight_per_sample(loss, snr, config, False), [2.0, 0.08])
    config = TrainingConfig.from_dict({"scale_v_pred_loss_like_noise_pred": True, "v_parameterization": True})
    assert close(weight_per_sample(loss, snr, config, True), [1.0, 2 * 25 / 26])

    # step_loss: mean per sample, times the sample weights, then the weights, then the batch mean
    prediction = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    table = torch.tensor([1.0, 25.0])
    config = TrainingConfig.from_dict({"min_snr_gamma": 5})
    value = step_loss(
        prediction, torch.zeros_like(prediction), torch.tensor([0, 1]), config, table, torch.ones(2), 2, False,
        sample_weights=torch.tensor([1.0, 0.5]),
    )  # fmt: skip
    assert close(value, (1.0 * 1.0 * 1.0 + 4.0 * 0.5 * 0.2) / 2)
    huber = TrainingConfig.from_dict({"loss_type": "huber", "huber_schedule": "constant", "huber_c": 0.5})
    value = step_loss(prediction[:1] * 1.2, torch.zeros(1, 1, 2, 2), torch.tensor([0]), huber, table, table, 2, False)
    assert close(value, 0.8)


# --- config -----------------------------------------------------------------------------------------------------


def test_kohyas_checks_are_errors_naming_the_options():
    for data, message in (
        ({"adaptive_noise_scale": 0.1}, "adaptive_noise_scale requires noise_offset"),
        ({"adaptive_noise_scale": 0.1, "noise_offset": 0}, "adaptive_noise_scale requires noise_offset"),
        ({"scale_v_pred_loss_like_noise_pred": True, "v_parameterization": False}, "only with v_parameterization"),
        ({"v_pred_like_loss": 0.2, "v_parameterization": True}, "v_pred_like_loss cannot be enabled with v_param"),
        ({"loss_type": "mse"}, "loss_type must be one of l1, l2, huber, smooth_l1"),
        ({"loss_type": "huber", "huber_schedule": "linear"}, "huber_schedule must be one of"),
        ({"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0}, "huber_c must be above 0"),
        ({"max_timestep": 1001}, "max_timestep must be at most 1000"),
        ({"min_timestep": 600, "max_timestep": 500}, "must not be larger than max_timestep"),
        ({"min_timestep": 1000}, "= 1000 is past the last timestep"),
        ({"multires_noise_iterations": -1}, "multires_noise_iterations must be at least 0"),
        ({"ip_noise_gamma": "strong"}, "ip_noise_gamma must be a number"),
    ):
        with pytest.raises(TrainingError, match=message):
            TrainingConfig.from_dict(data)
    config = TrainingConfig.from_dict(
        {"noise_offset_random_strength": True, "multires_noise_discount": 0.5, "huber_c": 0.2, "huber_scale": 1.0}
    )
    assert config.warnings == [
        "noise_offset_random_strength has no effect without noise_offset (as in kohya)",
        "multires_noise_discount has no effect without multires_noise_iterations (as in kohya)",
        "huber_c has no effect without loss_type huber or smooth_l1 (as in kohya)",
    ]
    snr = TrainingConfig.from_dict({"loss_type": "smooth_l1", "huber_scale": 2})
    assert snr.warnings == [
        "huber_scale has no effect without loss_type huber or smooth_l1 and huber_schedule constant or exponential "
        "(as in kohya)"
    ]
    assert (snr.loss_type, snr.huber_schedule, snr.huber_c, snr.huber_scale) == ("smooth_l1", "snr", 0.1, 2.0)
    assert TrainingConfig.from_dict({"min_timestep": 500, "max_timestep": 500}).max_timestep == 500


# --- tiny trainings ---------------------------------------------------------------------------------------------

BASE = {
    "max_train_steps": 2,
    "train_batch_size": 2,
    "resolution": "64,64",
    "seed": 1337,
    "caption_extension": ".txt",
    "learning_rate": 1e-2,
    "network_dim": 4,
    "network_alpha": 2,
    "cache_latents": True,
    "network_train_unet_only": True,
    "output_name": "out",
}
NEUTRAL = {
    "noise_offset": 0,
    "noise_offset_random_strength": False,
    "adaptive_noise_scale": 0,
    "multires_noise_iterations": 0,
    "multires_noise_discount": 0.3,
    "ip_noise_gamma": 0,
    "ip_noise_gamma_random_strength": False,
    "zero_terminal_snr": False,
    "min_snr_gamma": 0,
    "debiased_estimation_loss": False,
    "scale_v_pred_loss_like_noise_pred": False,
    "v_pred_like_loss": 0,
    "loss_type": "l2",
    "huber_schedule": "snr",
    "huber_c": 0.1,
    "huber_scale": 1.0,
    "min_timestep": 0,
    "max_timestep": 1000,
}


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """``trainer(**options)``: the trained LoRA's tensors and the result (cached per option set)."""
    from gpu_runtime.tiny import write_tiny_model

    base = tmp_path_factory.mktemp("noise")
    write_tiny_model(base / "tiny.safetensors", seed=0)
    folder = base / "dataset" / "1_tiny"  # 2 images, batch 2: one step per epoch
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(2):
        Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of a cat, number {i}\n")
    (base / "work").mkdir()
    runs: dict[str, tuple[dict[str, torch.Tensor], object]] = {}

    def run(**options):
        key = json.dumps(options, sort_keys=True)
        if key not in runs:
            name = f"run{len(runs)}"
            config = {**BASE, **options}
            path = base / f"{name}.toml"
            path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
            result = train(path, base / "tiny.safetensors", base / "dataset", base / name, device="cpu",
                           work_dir=base / "work")  # fmt: skip
            with safe_open(str(result.files[-1]), "pt") as handle:
                names = list(handle.keys())
                runs[key] = ({k: handle.get_tensor(k) for k in names}, result)
        return runs[key]

    return run


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_option_at_its_neutral_value_trains_the_default_lora(trainer):
    default, result = trainer()
    neutral, neutral_result = trainer(**NEUTRAL)
    assert same(default, neutral) and result.loss == neutral_result.loss
    assert neutral_result.warnings == result.warnings  # neutral values are not reported as ignored


V = {"v_parameterization": True}


@pytest.mark.parametrize(
    ("option", "baseline"),
    [
        ({"noise_offset": 0.1}, {}),
        ({"noise_offset": 0.1, "noise_offset_random_strength": True}, {"noise_offset": 0.1}),
        ({"noise_offset": 0.1, "adaptive_noise_scale": 0.5}, {"noise_offset": 0.1}),
        ({"multires_noise_iterations": 6}, {}),
        ({"multires_noise_iterations": 6, "multires_noise_discount": 0.8}, {"multires_noise_iterations": 6}),
        ({"ip_noise_gamma": 0.1}, {}),
        ({"ip_noise_gamma": 0.1, "ip_noise_gamma_random_strength": True}, {"ip_noise_gamma": 0.1}),
        ({"zero_terminal_snr": True}, {}),
        ({"min_snr_gamma": 1}, {}),
        ({**V, "min_snr_gamma": 1}, V),
        ({"debiased_estimation_loss": True}, {}),
        ({**V, "scale_v_pred_loss_like_noise_pred": True}, V),
        ({"v_pred_like_loss": 0.5}, {}),
        ({"loss_type": "l1"}, {}),
        ({"loss_type": "huber"}, {}),
        ({"loss_type": "huber", "huber_schedule": "exponential"}, {"loss_type": "huber"}),
        ({"loss_type": "huber", "huber_schedule": "constant", "huber_c": 0.5}, {"loss_type": "huber"}),
        ({"loss_type": "smooth_l1"}, {"loss_type": "huber"}),
        ({"min_timestep": 200, "max_timestep": 700}, {}),
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()) or "default",
)
def test_the_option_changes_the_trained_lora(trainer, option, baseline):
    changed, changed_result = trainer(**option)
    reference, reference_result = trainer(**baseline)
    assert not same(changed, reference)
    assert changed_result.loss != reference_result.loss
    assert not [w for w in changed_result.warnings if "no effect" in w or "ignored" in w]


def test_the_step_sees_the_noise_and_timesteps_the_options_ask_for(trainer, monkeypatch):
    """The draws of each step, observed in the loop: min_timestep = max_timestep trains that one timestep, and
    noise_offset makes the noise differ from the same run without it by one value per sample and channel."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = trainer_loop.noisy_latents

    def spy(config, scheduler, latents, generator, max_timestep):
        noise, noisy, timesteps = original(config, scheduler, latents, generator, max_timestep)
        seen.append((noise, timesteps))
        return noise, noisy, timesteps

    monkeypatch.setattr(trainer_loop, "noisy_latents", spy)
    trainer(min_timestep=321, max_timestep=321, seed=7)
    trainer(min_timestep=321, max_timestep=321, seed=7, noise_offset=0.1)
    assert [t.tolist() for _, t in seen] == [[321, 321]] * 4
    shift = seen[2][0] - seen[0][0]  # the first step of each run: same draws before the offset
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6) and shift.abs().min() > 0


def test_the_prediction_type_of_the_checkpoint_is_checked(trainer):
    """The tiny checkpoint predicts epsilon: what kohya refuses without v_parameterization fails at start."""
    with pytest.raises(TrainingError, match="scale_v_pred_loss_like_noise_pred can be enabled only with v_param"):
        trainer(scale_v_pred_loss_like_noise_pred=True)
    _, result = trainer(zero_terminal_snr=True)  # trained above
    assert "zero_terminal_snr is enabled without v_parameterization: training will be unexpected" in result.warnings


def test_metadata_records_the_options(trainer):
    """kohya's ss_* keys of these options (from runs trained above)."""

    def meta(**options) -> dict[str, str]:
        with safe_open(str(trainer(**options)[1].files[-1]), "pt") as handle:
            return handle.metadata()

    huber = meta(loss_type="huber", huber_schedule="constant", huber_c=0.5)
    assert (huber["ss_loss_type"], huber["ss_huber_schedule"], huber["ss_huber_c"]) == ("huber", "constant", "0.5")
    assert meta(noise_offset=0.1)["ss_noise_offset"] == "0.1"
    assert meta(multires_noise_iterations=6)["ss_multires_noise_iterations"] == "6"
    assert meta(ip_noise_gamma=0.1)["ss_ip_noise_gamma"] == "0.1"
    assert meta(zero_terminal_snr=True)["ss_zero_terminal_snr"] == "True"
    assert meta(debiased_estimation_loss=True)["ss_debiased_estimation"] == "True"
    default = meta()
    assert (default["ss_loss_type"], default["ss_multires_noise_iterations"], default["ss_huber_c"]) == (
        "l2", "None", "0.1",
    )  # fmt: skip
