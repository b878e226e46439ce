"""A1111 generation features on the tiny models (issue 12): hires fix, variation seeds, seed resize, ENSD, tiling,
and the infotext in each PNG's ``parameters`` chunk."""

import base64
import io
import json

import pytest

pytest.importorskip("diffusers")

from PIL import Image

from gpu_runtime.errors import JobError
from tests.gpu_runtime.conftest import make_request, pixels, png_size

BASE = {"prompt": "a photo of a cat", "seed": 21, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}


def run(engine, files, params, progress=None, **kw):
    request = make_request(files, "g", params, types=("Stable-diffusion",), **kw)
    return engine.run([engine.prepare("g", request)], progress)[0]


def image(engine, files, params, **kw):
    return pixels(run(engine, files, params, **kw)["images"][0])


def test_png_parameters_chunk_holds_the_infotext(engine, files):
    output = run(engine, files, {**BASE, "batch_size": 2})
    infotexts = json.loads(output["info"])["infotexts"]
    for encoded, infotext in zip(output["images"], infotexts, strict=True):
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).info["parameters"] == infotext
    assert "Seed: 22" in infotexts[1]


def test_subseed_strength_zero_is_no_subseed_and_one_is_the_subseeds_image(engine, files):
    plain = image(engine, files, BASE)
    assert (image(engine, files, {**BASE, "subseed": 99, "subseed_strength": 0}) == plain).all()
    full = run(engine, files, {**BASE, "subseed": 99, "subseed_strength": 1.0})
    assert (pixels(full["images"][0]) == image(engine, files, {**BASE, "seed": 99})).all()
    half = image(engine, files, {**BASE, "subseed": 99, "subseed_strength": 0.5})
    assert (half != plain).any()
    info = json.loads(full["info"])
    assert info["all_subseeds"] == [99] and "Variation seed: 99, Variation seed strength: 1" in info["infotexts"][0]
    batch = json.loads(run(engine, files, {**BASE, "subseed": 7, "subseed_strength": 0.3, "batch_size": 2})["info"])
    assert batch["all_seeds"] == [21, 21] and batch["all_subseeds"] == [7, 8]  # A1111: seed fixed, subseed + k


def test_seed_resize_draws_the_noise_at_another_size(engine, files):
    plain = image(engine, files, BASE)
    assert (image(engine, files, {**BASE, "seed_resize_from_w": 64, "seed_resize_from_h": 64}) == plain).all()
    resized = run(engine, files, {**BASE, "seed_resize_from_w": 128, "seed_resize_from_h": 96})
    assert (pixels(resized["images"][0]) != plain).any()
    assert "Seed resize from: 128x96" in json.loads(resized["info"])["infotexts"][0]


def test_eta_noise_seed_delta_changes_only_ancestral_samplers(engine, files):
    ensd = {"override_settings": {"eta_noise_seed_delta": 31337}}
    assert (image(engine, files, {**BASE, **ensd}) == image(engine, files, BASE)).all()  # Euler draws no more noise
    ancestral = {**BASE, "sampler_name": "Euler a"}
    assert (image(engine, files, {**ancestral, **ensd}) != image(engine, files, ancestral)).any()


def test_tiling_changes_the_image_and_is_undone_for_the_next_job(engine, files):
    plain = image(engine, files, BASE)
    tiled = run(engine, files, {**BASE, "tiling": True})
    assert (pixels(tiled["images"][0]) != plain).any()
    assert "Tiling: True" in json.loads(tiled["info"])["infotexts"][0]
    assert (image(engine, files, BASE) == plain).all()


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest)", "Lanczos"])
def test_hires_fix_returns_hr_scale_times_the_size_after_a_second_pass(engine, files, upscaler):
    seen = []
    params = {**BASE, "enable_hr": True, "hr_scale": 2, "hr_upscaler": upscaler, "denoising_strength": 0.5}
    output = run(engine, files, {**params, "hr_second_pass_steps": 3}, lambda s, t: seen.append((s, t)))
    assert png_size(output["images"][0]) == (128, 128)
    assert seen[-1] == (7, 7)  # 4 first-pass steps, then exactly hr_second_pass_steps
    info = json.loads(output["info"])
    assert (info["width"], info["height"]) == (128, 128)
    assert f"Hires upscale: 2, Hires steps: 3, Hires upscaler: {upscaler}" in info["infotexts"][0]
    assert "Size: 64x64" in info["infotexts"][0]  # A1111 writes the first pass's size


def test_hires_options_change_the_second_pass(engine, files):
    params = {**BASE, "enable_hr": True, "hr_scale": 1.5, "denoising_strength": 0.6}
    base = image(engine, files, params)
    assert base.shape[:2] == (96, 96)
    assert (image(engine, files, {**params, "hr_upscaler": "Lanczos"}) != base).any()
    assert (image(engine, files, {**params, "hr_prompt": "a painting of a dog"}) != base).any()
    assert (image(engine, files, {**params, "hr_sampler_name": "Heun"}) != base).any()
    assert (image(engine, files, {**params, "denoising_strength": 0.3}) != base).any()
    wide = run(engine, files, {**params, "hr_resize_x": 128})
    assert png_size(wide["images"][0]) == (128, 128)  # hr_resize_y 0 follows the aspect ratio
    covered = run(engine, files, {**params, "hr_resize_x": 128, "hr_resize_y": 96})
    assert png_size(covered["images"][0]) == (128, 96)  # both set: cover, then crop
    assert "Hires resize: 128x96" in json.loads(covered["info"])["infotexts"][0]


def test_hires_without_strength_or_with_a_second_checkpoint_is_refused(engine, files):
    with pytest.raises(JobError, match="enable_hr needs denoising_strength"):
        run(engine, files, {**BASE, "enable_hr": True, "denoising_strength": None})
    with pytest.raises(JobError, match="denoising_strength 0 is not supported"):
        run(engine, files, {**BASE, "enable_hr": True, "denoising_strength": 0})
    with pytest.raises(JobError, match="enable_hr with a variation seed"):
        run(engine, files, {**BASE, "enable_hr": True, "denoising_strength": 0.5, "subseed_strength": 0.5})
    with pytest.raises(JobError, match=r'hr_checkpoint_name="other\.safetensors" is not supported'):
        run(
            engine,
            files,
            {**BASE, "enable_hr": True, "denoising_strength": 0.5, "hr_checkpoint_name": "other.safetensors"},
        )
    with pytest.raises(JobError, match="hr_upscaler R-ESRGAN 4x\\+ is neither built in"):
        run(engine, files, {**BASE, "enable_hr": True, "denoising_strength": 0.5, "hr_upscaler": "R-ESRGAN 4x+"})


def test_sdxl_hires_and_variation_seeds(engine, files):
    params = {
        **BASE,
        "enable_hr": True,
        "hr_scale": 2,
        "denoising_strength": 0.5,
    }
    output = run(engine, files, params, checkpoint="xl.safetensors")
    assert png_size(output["images"][0]) == (128, 128)
    varied = run(engine, files, {**BASE, "subseed": 3, "subseed_strength": 0.4}, checkpoint="xl.safetensors")
    plain = run(engine, files, BASE, checkpoint="xl.safetensors")
    assert (pixels(varied["images"][0]) != pixels(plain["images"][0])).any()


def test_lcm_at_4_steps_uses_a1111s_timesteps(engine, files):
    seen = []
    output = run(
        engine, files, {**BASE, "sampler_name": "LCM", "steps": 4, "cfg_scale": 1}, lambda s, t: seen.append(s)
    )
    assert pixels(output["images"][0]).std() > 0 and seen == [1, 2, 3, 4]
    scheduler = next(iter(engine.pipelines.values())).pipe.scheduler
    assert type(scheduler).__name__ == "LCMScheduler"
    assert scheduler.timesteps.tolist() == [999, 679, 339, 19]  # A1111's LCM grid (diffusers': 999, 759, 499, 259)
    assert json.loads(output["info"])["sampler_name"] == "LCM"


def _count_calls(engine, names):
    """Forward pre-hooks counting each loaded checkpoint's UNet calls."""
    counts, hooks = {}, []
    for key, loaded in engine.pipelines.items():
        name = key[0].rsplit("/", 1)[-1]
        if name in names:
            counts[name] = 0
            hooks.append(
                loaded.pipe.unet.register_forward_pre_hook(lambda m, a, n=name: counts.__setitem__(n, counts[n] + 1))
            )
    return counts, hooks


def _refined(engine, files, **changes):
    from tests.gpu_runtime.conftest import model

    params = {**BASE, "steps": 10, "refiner_checkpoint": "other.safetensors", **changes}
    request = make_request(files, "r", params, types=("Stable-diffusion",))
    model(files, request, "Stable-diffusion", "c-other", "other.safetensors")
    return request


def test_refiner_runs_for_the_last_part_of_the_steps(engine, files):
    plain = image(engine, files, {**BASE, "steps": 10})
    request = _refined(engine, files, refiner_switch_at=0.6)
    engine.run([engine.prepare("r", request)])  # loads both
    counts, hooks = _count_calls(engine, {"tiny.safetensors", "other.safetensors"})
    try:
        output = engine.run([engine.prepare("r", _refined(engine, files, refiner_switch_at=0.6))])[0]
        assert counts == {"tiny.safetensors": 6, "other.safetensors": 4}  # the last 1 - 0.6 of 10 calls
        for name in counts:
            counts[name] = 0
        engine.run([engine.prepare("r", _refined(engine, files, refiner_switch_at=None))])
        assert counts == {"tiny.safetensors": 0, "other.safetensors": 10}  # null: from the first call (A1111)
    finally:
        for hook in hooks:
            hook.remove()
    assert "Refiner: other, Refiner switch at: 0.6" in json.loads(output["info"])["infotexts"][0]
    assert (pixels(output["images"][0]) != plain).any()
    assert (image(engine, files, {**BASE, "steps": 10}) == plain).all()  # the base UNet is back after the hand-over
    with pytest.raises(JobError, match=r"refiner_checkpoint missing\.safetensors was not sent with the job"):
        run(engine, files, {**BASE, "refiner_checkpoint": "missing.safetensors"})


def test_refiner_of_another_family_is_refused(engine, files):
    from tests.gpu_runtime.conftest import model

    request = make_request(files, "f", {**BASE, "refiner_checkpoint": "xl.safetensors"}, types=("Stable-diffusion",))
    model(files, request, "Stable-diffusion", "c-xl", "xl.safetensors")
    with pytest.raises(JobError, match="is a tiny-sdxl checkpoint and the model tiny-sd15"):
        engine.prepare("f", request)
