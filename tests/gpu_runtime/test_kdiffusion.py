"""A1111's k-diffusion samplers (issue 12): every loop against k-diffusion's own ``sampling.py`` (the package A1111
v1.8.0 samples with), A1111's sigma schedules, and the loops inside real diffusers pipelines on the tiny model.

Equalities are exact (``==``) wherever the same operations run on the same shapes; LMS is compared to 1e-6 because
k-diffusion integrates its coefficients numerically (``scipy.integrate.quad``) where ours are exact.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from gpu_runtime import kdiffusion
from tests.gpu_runtime import kdiffusion_reference

SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
MODEL = kdiffusion.ModelSigmas(SD_CONFIG)
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3


def toy_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A nonlinear stand-in for a UNet: the same for both implementations, so any difference is the sampler's."""
    return torch.tanh(x @ W) * (1 / (sigma**2 + 1)) ** 0.5 + x * 0.05


class ImageRNG:
    """A1111's ``TorchHijack``: k-diffusion's ``torch.randn_like`` draws from each image's own generator."""

    def __init__(self, generators):
        self.generators = generators

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators])


def generators():
    return [torch.Generator().manual_seed(s) for s in (5, 6)]


def reference(name, x, sigmas, brownian=False, **options):
    K = kdiffusion_reference.load()
    K.torch = ImageRNG(generators())
    try:
        extra = {}
        if brownian:
            positive = sigmas[sigmas > 0]
            extra["noise_sampler"] = K.BrownianTreeNoiseSampler(x, positive.min(), positive.max(), seed=[5, 6])
        model = lambda x, sigma, **_: toy_denoiser(x, sigma[0])  # noqa: E731
        if name == "dpm_fast":
            return K.sample_dpm_fast(
                model, x, float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1, disable=True, **options
            )
        return getattr(K, f"sample_{name}")(model, x, sigmas, disable=True, **extra, **options)
    finally:
        K.torch = torch


def ours(loop, x, sigmas, **options):
    noise = kdiffusion.Noise(generators(), seeds=[5, 6])
    positive = sigmas[sigmas > 0]
    noise.tree_range = (positive.min(), positive.max())
    run = kdiffusion.LOOPS[loop](x, sigmas, noise, kdiffusion.Options(**options))
    try:
        point, sigma = next(run)
        while True:
            point, sigma = run.send(toy_denoiser(point, sigma))
    except StopIteration as done:
        return done.value


CASES = [
    ("euler", {}, False),
    ("euler", {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}, False),
    ("euler_ancestral", {"eta": 0.7, "s_noise": 0.9}, False),
    ("heun", {"s_churn": 0.5}, False),
    ("dpm_2", {"s_churn": 0.5}, False),
    ("dpm_2_ancestral", {"eta": 1.0}, False),
    ("dpmpp_2s_ancestral", {"eta": 1.0, "s_noise": 0.95}, False),
    ("dpmpp_2m", {}, False),
    ("dpmpp_sde", {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 1.0}, True),
    ("dpmpp_2m_sde", {"eta": 0.5, "solver_type": "heun"}, True),
    ("dpmpp_3m_sde", {"eta": 1.0}, True),
    ("dpm_fast", {"eta": 1.0}, False),
    ("dpm_fast", {"eta": 0.0}, False),
]


@pytest.mark.parametrize("schedule", ["automatic", "karras", "exponential"])
@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize(("loop", "options", "brownian"), CASES, ids=lambda v: str(v))
def test_every_loop_equals_k_diffusion_bit_for_bit(loop, options, brownian, schedule, steps):
    sigmas = MODEL.schedule(schedule, steps)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    expected = reference(loop, x.clone(), sigmas, brownian, **options)
    assert torch.equal(ours(loop, x.clone(), sigmas, **options), expected)


@pytest.mark.parametrize("schedule", ["automatic", "karras"])
def test_lms_equals_k_diffusion_to_its_integration_tolerance(schedule):
    sigmas = MODEL.schedule(schedule, 20)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    expected = reference("lms", x.clone(), sigmas)
    assert torch.allclose(ours("lms", x.clone(), sigmas), expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours("lms", x.clone(), sigmas), ours("euler", x.clone(), sigmas))


def _ldm_alphas_cumprod() -> torch.Tensor:
    """CompVis ldm's ``register_schedule``: float64 numpy betas, cumprod, then one cast to float32."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def test_schedules_are_a1111s():
    K = kdiffusion_reference.load()

    class LDM:
        alphas_cumprod = _ldm_alphas_cumprod()

    compvis = kdiffusion_reference.load("external").CompVisDenoiser(LDM())  # A1111's model_wrap
    assert torch.equal(MODEL.sigmas, compvis.sigmas)
    assert MODEL.sigma_max == pytest.approx(14.6146, abs=1e-4) and MODEL.sigma_min == pytest.approx(0.0292, abs=1e-4)
    low, high = MODEL.sigma_min, MODEL.sigma_max
    for n in (1, 10, 20, 33):
        assert torch.equal(MODEL.schedule("automatic", n), compvis.get_sigmas(n))
        assert torch.equal(MODEL.schedule("karras", n), K.get_sigmas_karras(n, low, high))
        assert torch.equal(MODEL.schedule("exponential", n), K.get_sigmas_exponential(n, low, high))
        assert torch.equal(MODEL.schedule("polyexponential", n), K.get_sigmas_polyexponential(n, low, high))
        discarded = MODEL.schedule("automatic", n, discard=True)  # n + 1 sigmas, the penultimate dropped
        full = compvis.get_sigmas(n + 1)
        assert torch.equal(discarded, torch.cat([full[:-2], full[-1:]]))
    for sigma in MODEL.schedule("karras", 15)[:-1]:
        assert torch.equal(MODEL.t(sigma), compvis.sigma_to_t(sigma))  # the UNet's fractional timestep
    sgm = MODEL.schedule("sgm_uniform", 10)
    assert len(sgm) == 11 and float(sgm[0]) == pytest.approx(high) and float(sgm[-2]) > low


def test_restart_below_20_steps_is_heun_on_karras_and_above_it_restarts_once():
    sigmas = MODEL.schedule("karras", 12)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    assert torch.equal(ours("restart", x.clone(), sigmas), reference("heun", x.clone(), sigmas))
    asked = kdiffusion.plan("restart", MODEL.schedule("karras", 20), kdiffusion.Options())
    assert len(asked) == 2 * 20 - 1  # 20 Heun steps, the last one Euler
    rises = [(float(a), float(b)) for a, b in itertools.pairwise(asked) if b > a * 1.0001]
    # Heun's own second evaluations step down; the one jump up is the restart from ~0.1 back to ~2
    assert len(rises) == 1 and rises[0][0] == pytest.approx(0.1, rel=0.5) and rises[0][1] == pytest.approx(2, rel=0.3)
    assert len(kdiffusion.plan("restart", MODEL.schedule("karras", 40), kdiffusion.Options())) == 2 * 40 - 1


def test_second_order_samplers_ask_for_two_calls_a_step_but_the_last():
    for loop in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"):
        assert len(kdiffusion.plan(loop, MODEL.schedule("automatic", 10), kdiffusion.Options())) == 19, loop
    assert len(kdiffusion.plan("dpm_fast", MODEL.schedule("automatic", 10), kdiffusion.Options())) == 10


# --- inside diffusers pipelines, on the tiny model -------------------------------------------------------------------


def _pipe(engine, files):
    from tests.gpu_runtime.test_engine_correctness import SMALL, job

    prepared = job(engine, files, SMALL)
    return engine.load(prepared.checkpoint, prepared.family)


def _guided_denoiser(pipe, cond, uncond, scale, sigmas_model):
    """A1111's CFGDenoiser around the same UNet, in the pipeline's CFG layout: x0 = x - sigma * eps."""

    def model(x, sigma, **_):
        sigma = sigma[0]
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        t = sigmas_model.t(sigma)
        eps = pipe.unet(torch.cat([x] * 2) * c_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        return x - (eps_uncond + scale * (eps_cond - eps_uncond)) * sigma

    return model


@pytest.mark.parametrize(
    ("name", "function", "kind"),
    [
        ("Euler", "sample_euler", "automatic"),
        ("Euler a", "sample_euler_ancestral", "automatic"),
        ("DPM++ 2M Karras", "sample_dpmpp_2m", "karras"),
        ("DPM++ SDE", "sample_dpmpp_sde", "automatic"),
        ("DPM++ 3M SDE Exponential", "sample_dpmpp_3m_sde", "exponential"),
    ],
)
def test_the_pipeline_loop_equals_k_diffusion_around_the_same_unet(engine, files, name, function, kind):
    from gpu_runtime.conditioning import encode_sd
    from gpu_runtime.samplers import K_SAMPLERS, scheduler_for

    K = kdiffusion_reference.load()
    loaded = _pipe(engine, files)
    pipe = loaded.pipe
    with torch.inference_mode():
        cond, uncond = encode_sd(pipe, "a photo of a cat", 1), encode_sd(pipe, "blurry", 1)
    seeds, steps = [21, 22], 6
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond2, uncond2 = torch.cat([cond] * 2), torch.cat([uncond] * 2)

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for g in gens:
        torch.randn(4, 8, 8, generator=g)  # the first draw is the starting noise (A1111's ImageRNG.first)
    pipe.scheduler = scheduler_for(name, loaded.scheduler_config, seeds, generators=gens)
    with torch.inference_mode():
        ours_latents = pipe(
            prompt_embeds=cond2,
            negative_prompt_embeds=uncond2,
            latents=noise.clone(),
            num_inference_steps=steps,
            guidance_scale=7.0,
            output_type="latent",
        ).images

    sampler = K_SAMPLERS[name]
    sigmas = MODEL.schedule(kind, steps, sampler.discard)
    rng = [torch.Generator().manual_seed(s) for s in seeds]
    for g in rng:
        torch.randn(4, 8, 8, generator=g)
    K.torch = ImageRNG(rng)
    extra = {}
    if "SDE" in name:
        positive = sigmas[sigmas > 0]
        extra["noise_sampler"] = K.BrownianTreeNoiseSampler(noise, positive.min(), positive.max(), seed=seeds)
    try:
        with torch.inference_mode():
            model = _guided_denoiser(pipe, cond2, uncond2, 7.0, MODEL)
            expected = getattr(K, function)(model, noise.clone() * sigmas[0], sigmas, disable=True, **extra)
    finally:
        K.torch = torch
    # the CFG mix is done on eps in both; the only difference allowed is none
    assert torch.equal(ours_latents, expected.to(ours_latents.dtype)), (ours_latents - expected).abs().max()


def test_img2img_runs_a1111s_cut_of_the_schedule(engine, files):
    from gpu_runtime.samplers import scheduler_for

    loaded = _pipe(engine, files)
    scheduler = scheduler_for("Euler", loaded.scheduler_config, denoise=int(0.5 * 20) + 1)
    scheduler.set_timesteps(20)
    full = MODEL.schedule("automatic", 20)
    assert torch.equal(scheduler.sigmas, full[20 - 10 - 1 :]) and len(scheduler.timesteps) == 11  # t_enc + 1 steps
    start = torch.zeros(1, 4, 8, 8)
    assert torch.equal(scheduler.add_noise(start, torch.ones_like(start), scheduler.timesteps[:1]), start + full[9])


# --- the engine: names, schedules and options ------------------------------------------------------------------------


def test_every_sampler_name_runs_and_the_schedule_options_mean_what_they_say(engine, files):
    from gpu_runtime.protocol import policy
    from tests.gpu_runtime.test_engine_correctness import SMALL, image, run

    base = {**SMALL, "steps": 5}
    images = {name: image(engine, files, {**base, "sampler_name": name}) for name in policy.SAMPLER_NAMES}
    assert len({im.tobytes() for im in images.values()}) >= len(images) - 2  # LMS/Euler-like pairs may round alike
    # the v1.9 scheduler field and v1.8's k_sched_type give the v1.8 name's image exactly
    assert (
        image(engine, files, {**base, "sampler_name": "DPM++ 2M", "scheduler": "Karras"}) == images["DPM++ 2M Karras"]
    ).all()
    overrides = {"override_settings": {"k_sched_type": "karras"}}
    assert (image(engine, files, {**base, "sampler_name": "DPM++ 2M", **overrides}) == images["DPM++ 2M Karras"]).all()
    # a schedule suffix in the name wins over the field (A1111 v1.9)
    assert (
        image(engine, files, {**base, "sampler_name": "DPM++ 2M Karras", "scheduler": "Exponential"})
        == images["DPM++ 2M Karras"]
    ).all()
    # ancestral with eta 0 is plain Euler; churn and s_noise change what they touch
    assert (image(engine, files, {**base, "sampler_name": "Euler a", "eta": 0}) == images["Euler"]).all()
    churned = image(engine, files, {**base, "sampler_name": "Euler", "s_churn": 1.0})
    assert abs(churned - images["Euler"]).mean() > 1
    assert (image(engine, files, {**base, "sampler_name": "Euler", "s_churn": 0, "s_tmax": 0}) == images["Euler"]).all()
    quieter = image(engine, files, {**base, "sampler_name": "DPM++ 2S a", "s_noise": 0.5})
    assert abs(quieter - images["DPM++ 2S a"]).mean() > 1
    discarded = image(
        engine,
        files,
        {**base, "sampler_name": "Euler", "override_settings": {"always_discard_next_to_last_sigma": True}},
    )
    assert abs(discarded - images["Euler"]).mean() > 0.1
    output = run(engine, files, {**base, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "eta": 0.5})
    info = json.loads(output["info"])
    assert "Schedule type: Karras" in info["infotexts"][0]
    assert any("eta had no effect" in note for note in info["notes"])  # DPM++ 2M takes no eta, as in A1111


def test_refusals_name_what_cannot_run(engine, files):
    from gpu_runtime.errors import JobError
    from tests.gpu_runtime.test_engine_correctness import SMALL, run

    with pytest.raises(JobError, match="sampler DPM adaptive is not supported; use one of"):
        run(engine, files, {**SMALL, "sampler_name": "DPM adaptive"})
    with pytest.raises(JobError, match='scheduler="Karras" is not supported with sampler UniPC'):
        run(engine, files, {**SMALL, "sampler_name": "UniPC", "scheduler": "Karras"})
    with pytest.raises(JobError, match="k_sched_type=karras does not apply to sampler DDIM"):
        run(engine, files, {**SMALL, "sampler_name": "DDIM", "override_settings": {"k_sched_type": "karras"}})
    with pytest.raises(JobError, match="s_churn must be between"):
        run(engine, files, {**SMALL, "s_churn": -1})
    assert math.isinf(dict(_options(engine, files, {"s_tmax": 0}))["s_tmax"])


def _options(engine, files, params):
    from tests.gpu_runtime.test_engine_correctness import SMALL, job

    return job(engine, files, {**SMALL, "sampler_name": "Euler", **params}).sampler_options
