"""img2img inpainting as A1111 does it (issue 12): the mask's rules, and the image outside the mask kept."""

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image

from gpu_runtime import masking
from gpu_runtime.errors import JobError
from tests.gpu_runtime.conftest import make_request, pixels, png_size

BASE = {"prompt": "a photo of a cat", "seed": 4, "steps": 6, "width": 64, "height": 64, "sampler_name": "Euler"}


def b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def source(size=(64, 64)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def square_mask(size=(64, 64), box=(16, 16, 48, 48)):
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def run(engine, files, params):
    request = make_request(files, "i", params, task="img2img", types=("Stable-diffusion",))
    return engine.run([engine.prepare("i", request)])[0]


def test_binary_mask_blur_and_crop_follow_a1111():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((2, 2), (0, 0, 0, 200))
    rgba.putpixel((3, 3), (0, 0, 0, 100))
    binary = masking.binary_mask(rgba)
    assert binary.getpixel((2, 2)) == 255 and binary.getpixel((3, 3)) == 0  # alpha thresholded at 128
    assert masking.binary_mask(Image.new("RGB", (4, 4), (255, 255, 255))).getpixel((0, 0)) == 255
    assert masking._gaussian_kernel(4).size == 2 * int(2.5 * 4 + 0.5) + 1
    blurred = np.asarray(masking.blur(square_mask(), 4, 4))
    assert blurred[32, 32] == 255 and blurred[0, 0] == 0 and 0 < blurred[32, 14] < 255  # soft edges
    assert masking.crop_region(square_mask(), 4) == (12, 12, 52, 52)
    assert masking.expand_to_ratio((10, 20, 30, 30), 64, 32, 100, 100) == (10, 20, 30, 30)
    assert masking.expand_to_ratio((10, 10, 30, 50), 64, 64, 100, 100) == (0, 10, 40, 50)


@pytest.mark.parametrize("full_res", [False, True])
def test_inpainted_image_equals_the_input_outside_the_mask(engine, files, full_res):
    original = source()
    params = {**BASE, "init_images": [b64(original)], "mask": b64(square_mask()), "denoising_strength": 0.9}
    params.update(inpaint_full_res=full_res, inpaint_full_res_padding=8, mask_blur=0, inpainting_fill=1)
    output = run(engine, files, params)
    result = pixels(output["images"][0])
    kept = np.asarray(original).astype(int)
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert (result[outside] == kept[outside]).all()  # A1111's final composite of the original
    assert np.abs(result[~outside] - kept[~outside]).mean() > 5  # and the masked square was repainted


def test_mask_invert_fill_modes_and_full_res_size(engine, files):
    original = source((96, 64))
    base = {**BASE, "init_images": [b64(original)], "mask": b64(square_mask((96, 64), (8, 8, 40, 40)))}
    base.update(denoising_strength=0.8, mask_blur=0)
    full = run(engine, files, {**base, "inpaint_full_res": True})
    assert png_size(full["images"][0]) == (96, 64)  # full resolution: the original's size comes back
    square = {**base, "init_images": [b64(source())], "mask": b64(square_mask()), "inpaint_full_res": False}
    inverted = pixels(run(engine, files, {**square, "inpainting_mask_invert": 1})["images"][0])
    kept = np.asarray(source()).astype(int)
    assert (inverted[18:46, 18:46] == kept[18:46, 18:46]).all()  # inverted: the square is what is kept
    images = [
        pixels(run(engine, files, {**base, "inpaint_full_res": False, "inpainting_fill": f})["images"][0])
        for f in (0, 1, 2, 3)
    ]
    for a in range(4):
        for b in range(a + 1, 4):
            assert (images[a] != images[b]).any(), (a, b)  # each masked-content mode starts differently
    with pytest.raises(JobError, match="the mask is empty"):
        run(engine, files, {**base, "mask": b64(Image.new("L", (96, 64), 0))})
    assert json.loads(full["info"])["denoising_strength"] == 0.8


# --- inpainting checkpoints (9-channel UNet) ---------------------------------------------------------------------


def _capture_unet_inputs(engine, monkeypatch):
    """Record what the checkpoint's own UNet receives (the wrapper's concatenated input)."""
    from gpu_runtime import inpainting_models

    seen = []
    original = inpainting_models.ConditionedUNet.forward

    def forward(self, sample, timestep, *args, **kwargs):
        extra = self.conditioning.to(sample.device, sample.dtype)
        seen.append(torch.cat([sample, extra.repeat(sample.shape[0] // extra.shape[0], 1, 1, 1)], dim=1))
        return original(self, sample, timestep, *args, **kwargs)

    monkeypatch.setattr(inpainting_models.ConditionedUNet, "forward", forward)
    return seen


def _inpaint_request(files, params, task):
    return make_request(files, "p", params, task=task, types=("Stable-diffusion",), checkpoint="inpaint.safetensors")


import torch  # noqa: E402


def test_an_inpainting_checkpoint_gets_a1111s_image_conditioning(engine, files, monkeypatch):
    seen = _capture_unet_inputs(engine, monkeypatch)
    job = engine.prepare("p", _inpaint_request(files, {**BASE, "steps": 3}, "txt2img"))
    assert job.family == "tiny-sd15-inpainting"
    output = engine.run([job])[0]
    assert png_size(output["images"][0]) == (64, 64)
    # txt2img: every UNet call has 9 channels - the latents, an all-ones mask, the latents of a mid-grey image
    assert seen and all(x.shape[1] == 9 for x in seen) and all((x[:, 4] == 1).all() for x in seen)

    seen.clear()
    original = source()
    mask = square_mask(box=(0, 0, 32, 64))  # the left half is repainted
    params = {**BASE, "init_images": [b64(original)], "mask": b64(mask), "mask_blur": 0, "denoising_strength": 0.9}
    params.update(inpaint_full_res=False, inpainting_fill=1)
    result = pixels(engine.run([engine.prepare("p", _inpaint_request(files, params, "img2img"))])[0]["images"][0])
    channel = seen[0][0, 4]
    assert (channel[:, :4] == 1).all() and (channel[:, 4:] == 0).all()  # the mask at latent size: left half
    assert (result[:, 40:] == np.asarray(original)[:, 40:]).all()  # kept outside the mask (and its blur-free edge)

    # the masked image's latents are conditioning: another picture outside the mask changes the inpainted half
    seen.clear()
    other = np.asarray(original).copy()
    other[:, 32:] = 255 - other[:, 32:]
    changed = {**params, "init_images": [b64(Image.fromarray(other))]}
    again = pixels(engine.run([engine.prepare("p", _inpaint_request(files, changed, "img2img"))])[0]["images"][0])
    assert abs(again[:, :24].astype(int) - result[:, :24].astype(int)).mean() > 0.5


def test_an_inpainting_checkpoint_cannot_be_trained_on(tmp_path, files):
    from gpu_runtime.trainer import TrainingError, _load_model

    with pytest.raises(TrainingError, match="inpainting checkpoint"):
        _load_model(files.root / "inpaint.safetensors", tmp_path, "cpu", torch.float32)


def test_resize_mode_3_resizes_the_latents_and_noise_multiplier_scales_the_noise(engine, files):
    """A1111's "Just resize (latent upscale)": the image is encoded at its own size and its latents resized; at
    the same size that is exactly resize mode 0. ``initial_noise_multiplier`` scales img2img's starting noise."""
    original = source()
    params = {**BASE, "init_images": [b64(original)], "denoising_strength": 0.6}
    plain = pixels(run(engine, files, params)["images"][0])
    assert (pixels(run(engine, files, {**params, "resize_mode": 3})["images"][0]) == plain).all()
    small = {**params, "init_images": [b64(source((32, 48)))]}
    latent = run(engine, files, {**small, "resize_mode": 3})
    assert png_size(latent["images"][0]) == (64, 64)
    assert abs(pixels(latent["images"][0]).astype(int) - pixels(run(engine, files, small)["images"][0])).mean() > 1

    assert (pixels(run(engine, files, {**params, "initial_noise_multiplier": 1.0})["images"][0]) == plain).all()
    quieter = run(engine, files, {**params, "initial_noise_multiplier": 0.5})
    assert abs(pixels(quieter["images"][0]).astype(int) - plain).mean() > 1
    assert "Noise multiplier: 0.5" in json.loads(quieter["info"])["infotexts"][0]
    with pytest.raises(JobError, match="initial_noise_multiplier with sampler DDIM"):
        run(engine, files, {**params, "sampler_name": "DDIM", "initial_noise_multiplier": 0.5})
    with pytest.raises(JobError, match=r"resize_mode=3 .* with a mask"):
        run(engine, files, {**params, "resize_mode": 3, "mask": b64(square_mask())})
