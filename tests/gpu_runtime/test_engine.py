"""The engine on the tiny model, on CPU: A1111 parameters in, contract §12.3 output out."""

import json

import pytest

pytest.importorskip("diffusers")

from gpu_runtime.errors import JobError
from tests.gpu_runtime.conftest import make_request, pixels, png_size

BASE = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "seed": 42,
    "steps": 3,
    "cfg_scale": 7,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler a",
}


def run(engine, files, job_id, params, **kw):
    request = make_request(files, job_id, params, **kw)
    return engine.run([engine.prepare(job_id, request)])[0]


def test_txt2img_output_shape_and_determinism(engine, files):
    output = run(engine, files, "j1", {**BASE, "batch_size": 2})
    assert set(output) == {"images", "parameters", "info", "html_info"}
    assert [png_size(i) for i in output["images"]] == [(64, 64), (64, 64)]
    info = json.loads(output["info"])
    assert info["all_seeds"] == [42, 43] and info["sd_model_name"] == "tiny" and info["steps"] == 3
    assert output["parameters"]["prompt"] == "a photo of a cat"
    assert "Seed: 42" in output["html_info"]
    again = run(engine, files, "j2", {**BASE, "batch_size": 2})
    assert (pixels(again["images"][0]) == pixels(output["images"][0])).all()  # same seed -> same image
    other_prompt = run(engine, files, "j3", {**BASE, "prompt": "a painting of a red dog"})
    assert (pixels(other_prompt["images"][0]) != pixels(output["images"][0])).any()
    other_seed = run(engine, files, "j4", {**BASE, "seed": 7})
    assert (pixels(other_seed["images"][0]) != pixels(output["images"][0])).any()


def test_random_seed_is_reported(engine, files):
    info = json.loads(run(engine, files, "j", {**BASE, "seed": -1, "n_iter": 2})["info"])
    assert len(info["all_seeds"]) == 2 and info["all_seeds"][1] == (info["all_seeds"][0] + 1) % 2**32


def test_img2img(engine, files):
    source = run(engine, files, "src", BASE)["images"][0]
    params = {**BASE, "init_images": [source], "denoising_strength": 0.6, "width": 64, "height": 64}
    output = run(engine, files, "i2i", params, task="img2img")
    assert png_size(output["images"][0]) == (64, 64)
    assert json.loads(output["info"])["denoising_strength"] == 0.6


def test_lora_tag_changes_the_output_and_its_absence_restores_it(engine, files):
    plain = run(engine, files, "a", BASE)["images"][0]
    styled = run(engine, files, "b", {**BASE, "prompt": "a photo of a cat <lora:style:1>"})["images"][0]
    assert (pixels(styled) != pixels(plain)).any()
    again = run(engine, files, "c", BASE)["images"][0]
    assert abs(pixels(again) - pixels(plain)).max() <= 1  # adapters stay loaded but are off


def test_embedding_vae_and_clip_skip_run(engine, files):
    params = {
        **BASE,
        "prompt": "mystyle cat",
        "override_settings": {"sd_vae": "tiny.vae.safetensors", "CLIP_stop_at_last_layers": 2},
    }
    output = run(engine, files, "v", params, types=("Stable-diffusion", "VAE", "embeddings"))
    info = json.loads(output["info"])
    assert info["sd_vae_name"] == "tiny.vae.safetensors" and info["clip_skip"] == 2


def test_checkpoint_override_picks_the_named_model(engine, files):
    base = run(engine, files, "x", BASE)["images"][0]
    other = run(
        engine,
        files,
        "y",
        {**BASE, "override_settings": {"sd_model_checkpoint": "other"}},
        checkpoint="other.safetensors",
    )["images"][0]
    assert (pixels(other) != pixels(base)).any()


def test_batched_jobs_equal_unbatched(engine, files):
    prompts = ["a photo of a cat", "a red dog", "the painting"]
    jobs = [
        engine.prepare(f"b{i}", make_request(files, f"b{i}", {**BASE, "prompt": p, "seed": 10 + i}))
        for i, p in enumerate(prompts)
    ]
    assert len({job.batch_key() for job in jobs}) == 1
    batched = engine.run(jobs)
    for i, p in enumerate(prompts):
        alone = run(engine, files, f"s{i}", {**BASE, "prompt": p, "seed": 10 + i})
        assert abs(pixels(batched[i]["images"][0]) - pixels(alone["images"][0])).max() <= 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sampler_name": "Foo"}, "sampler Foo is not supported"),
        ({"width": 60}, "multiples of 8"),
        ({"steps": 0}, "steps must be between 1 and 150"),
        ({"steps": "many"}, "steps must be a whole number"),
        ({"prompt": "x <lora:missing:1>"}, "lora missing is not available"),
        ({"override_settings": {"sd_vae": "nope.pt"}}, "VAE nope.pt was not sent with the job"),
        ({"batch_size": 50, "n_iter": 2}, "at most 64"),
    ],
)
def test_bad_parameters_are_job_errors(engine, files, params, message):
    with pytest.raises(JobError, match=message):
        engine.prepare("bad", make_request(files, "bad", {**BASE, **params}))


def test_img2img_needs_an_image(engine, files):
    with pytest.raises(JobError, match="img2img needs init_images"):
        engine.prepare("bad", make_request(files, "bad", BASE, task="img2img"))
    with pytest.raises(JobError, match="could not be decoded"):
        engine.prepare("bad", make_request(files, "bad", {**BASE, "init_images": ["not-an-image"]}, task="img2img"))


def test_extras(engine, files):
    image = run(engine, files, "src", BASE)["images"][0]
    single = run(
        engine,
        files,
        "e1",
        {"image": image, "upscaler_1": "Lanczos", "upscaling_resize": 2},
        task="extra-single-image",
        types=(),
    )
    assert png_size(single["image"]) == (128, 128)
    batch = run(
        engine,
        files,
        "e2",
        {
            "imageList": [{"data": image, "name": "a"}],
            "resize_mode": 1,
            "upscaling_resize_w": 100,
            "upscaling_resize_h": 50,
            "upscaler_1": "Nearest",
        },
        task="extra-batch-images",
        types=(),
    )
    assert [png_size(i) for i in batch["images"]] == [(100, 50)]
    with pytest.raises(JobError, match="upscaler R-ESRGAN 4x\\+ is neither built in"):
        run(engine, files, "e3", {"image": image, "upscaler_1": "R-ESRGAN 4x+"}, task="extra-single-image", types=())
    with pytest.raises(JobError, match=r"rembg model u2net needs a checkpoint of type rembg with a file u2net\.onnx"):
        run(engine, files, "e4", {"input_image": image, "model": "u2net"}, task="rembg", types=())


def test_model_files_are_downloaded_once(engine, files):
    run(engine, files, "d1", BASE)
    path = engine.files.path("c-tiny.safetensors", "tiny.safetensors")
    assert path.exists()
    stamp = path.stat().st_ino
    run(engine, files, "d2", BASE)
    assert path.stat().st_ino == stamp
