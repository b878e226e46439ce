"""ControlNet's inpaint modules (issue 14), as sd-webui-controlnet runs them: the model sees the unit's image with
the masked pixels at -1 (``inpaint``, shown as inpaint_global_harmonious); ``inpaint_only`` also pulls every noise
prediction towards the image outside the mask and pastes the image back outside the (dilated, blurred) mask."""

import base64
import dataclasses
import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_runtime import controlnet
from gpu_runtime.errors import JobError
from tests.gpu_runtime.conftest import make_request, model, pixels

BASE = {"prompt": "a photo of a cat", "seed": 8, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def picture() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([x * 4, y * 4, 255 - x * 2], axis=-1).astype(np.uint8)


def right_half(red_only: bool = False) -> np.ndarray:
    """A mask of the right half; ``red_only``: drawn in the first channel only, which is the one the unit reads."""
    mask = np.zeros((64, 64, 3), dtype=np.uint8)
    mask[:, 32:, 0] = 255
    if not red_only:
        mask[:, 32:, 1:] = 255
    return mask


def inpaint_unit(module="inpaint_only"):
    return {"enabled": True, "module": module, "model": "cn", "image": png(picture()), "mask": png(right_half())}


def generate(engine, files, params, task="txt2img"):
    request = make_request(files, "p", params, task=task, types=("Stable-diffusion",))
    model(files, request, "ControlNet", "c-cn.safetensors", "cn.safetensors")
    return pixels(engine.run([engine.prepare("p", request)])[0]["images"][0])


def test_the_model_sees_the_image_with_the_masked_pixels_at_minus_one():
    unit = controlnet.units_of(
        {"alwayson_scripts": {"controlnet": {"args": [{**inpaint_unit("inpaint"), "mask": png(right_half(True))}]}}},
        {"cn": "cn.safetensors"},
        [],
    )[0]
    hint = controlnet.control_image(unit, 64, 64)[0].numpy().transpose(1, 2, 0)
    assert (hint[:, 32:] == -1).all()
    assert np.array_equal(hint[:, :32], picture()[:, :32].astype(np.float32) / 255)
    no_mask = controlnet.units_of(
        {"alwayson_scripts": {"controlnet": {"args": [{**inpaint_unit("inpaint"), "mask": None}]}}},
        {"cn": "cn.safetensors"},
        [],
    )[0]
    assert (controlnet.control_image(no_mask, 64, 64) >= 0).all()  # nothing masked


def test_inpaint_only_keeps_the_image_outside_the_mask_and_repaints_inside(engine, files):
    units = {"alwayson_scripts": {"controlnet": {"args": [inpaint_unit()]}}}
    kept = generate(engine, files, {**BASE, **units})
    original = picture().astype(int)
    # the paste's mask is dilated and then blurred by 7 px boxes: 6 px left of the edge the picture is exact
    assert np.array_equal(kept[:, :26], original[:, :26])
    assert np.abs(kept[:, 40:] - original[:, 40:]).mean() > 10  # repainted
    harmonious = {"alwayson_scripts": {"controlnet": {"args": [inpaint_unit("inpaint_global_harmonious")]}}}
    assert np.abs(generate(engine, files, {**BASE, **harmonious})[:, :26] - original[:, :26]).mean() > 10


def test_img2img_inpainting_turns_inpaint_only_into_inpaint_as_the_extension_does(engine, files):
    params = {
        **BASE,
        "init_images": [png(picture())],
        "mask": png(right_half()),
        "denoising_strength": 0.75,
        "alwayson_scripts": {"controlnet": {"args": [{"module": "inpaint_only", "model": "cn", "image": None}]}},
    }
    request = make_request(files, "p", params, task="img2img", types=("Stable-diffusion",))
    model(files, request, "ControlNet", "c-cn.safetensors", "cn.safetensors")
    job = engine.prepare("p", request)
    assert [unit.module for unit in job.control] == ["inpaint"]
    hint = controlnet.control_image(job.control[0], 64, 64)[0].numpy()
    assert (hint[:, :, 40:] == -1).all() and (hint[:, :, :24] >= 0).all()  # A1111's (blurred) mask is the unit's
    engine.files.release(job.files)


class _Net(torch.nn.Module):
    def forward(self, *args, **kwargs):
        return None


class _UNet(torch.nn.Module):
    """A noise prediction the test knows, so the blend can be checked by its formula."""

    def forward(self, sample, timestep, **kwargs):
        return (torch.full_like(sample, 0.3),)


def test_the_latent_blend_pulls_the_prediction_towards_the_image_outside_the_mask_while_the_unit_is_active():
    from gpu_runtime.kdiffusion import ModelSigmas
    from gpu_runtime.tiny import build_tiny_vae

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    pipe = SimpleNamespace(
        scheduler=SimpleNamespace(config=config), vae=build_tiny_vae(), controlnet=_Net(), unet=_UNet()
    )
    unit = controlnet.units_of({"alwayson_scripts": {"controlnet": {"args": [inpaint_unit()]}}}, {"cn": "cn"}, [])[0]
    unit = dataclasses.replace(unit, weight=0.5)
    hooks = []
    controlnet.inpaint_only_hooks(pipe, [unit], 64, 64, hooks)
    sample, t = torch.randn(2, 4, 8, 8), torch.tensor(500.0)
    pipe.controlnet(sample, t, conditioning_scale=0.0)  # outside guidance_start..end: untouched
    assert (pipe.unet(sample, t)[0] == 0.3).all()
    pipe.controlnet(sample, t, conditioning_scale=1.0)
    blended = pipe.unet(sample, t)[0]
    a = 1 / (1 + ModelSigmas(config).sigmas[500] ** 2)
    rgb, _ = controlnet.inpaint_parts(unit, 64, 64)
    pixels_ = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2 - 1
    with torch.no_grad():
        origin = pipe.vae.encode(pixels_).latent_dist.mean * pipe.vae.config.scaling_factor
    towards = (sample - a.sqrt() * origin) / (1 - a).sqrt()  # the prediction whose x0 is the image
    assert torch.allclose(blended[..., :3], 0.5 * towards[..., :3] + 0.5 * 0.3, atol=1e-4)  # unmasked columns
    assert torch.allclose(blended[..., 5:], torch.full_like(blended[..., 5:], 0.3), atol=1e-6)  # masked (pooled)
    for hook in hooks:
        hook.remove()


def test_refusals(engine, files):
    units = {"alwayson_scripts": {"controlnet": {"args": [{**inpaint_unit(), "module": "canny"}]}}}
    with pytest.raises(JobError, match="a mask on a canny unit is not supported"):
        generate(engine, files, {**BASE, **units})
    units = {"alwayson_scripts": {"controlnet": {"args": [{**inpaint_unit(), "image": None}]}}}
    with pytest.raises(JobError, match="ControlNet unit 0: a mask needs the unit's image"):
        generate(engine, files, {**BASE, **units})
    units = {"alwayson_scripts": {"controlnet": {"args": [inpaint_unit()]}}}
    with pytest.raises(JobError, match="subseed must be an integer"):  # it seeds the preprocessors
        generate(engine, files, {**BASE, **units, "subseed": "abc"})
