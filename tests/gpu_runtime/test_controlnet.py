"""ControlNet units (issue 14, first part): the sd-webui-controlnet unit format on diffusers' ControlNet pipelines,
with tiny random ControlNets built from the tiny models' configs (SD 1.5 and SDXL)."""

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import named_models
from tests.gpu_runtime.conftest import make_request, model, pixels

BASE = {"prompt": "a photo of a cat", "seed": 8, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler"}


def hint() -> str:
    """A map with structure: white on the left, black on the right (a line drawing's extremes)."""
    pixels_ = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels_[:, :32] = 255
    image = Image.fromarray(pixels_)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unit(**fields):
    return {
        "enabled": True,
        "module": "none",
        "model": "cn.safetensors [abc123]",
        "weight": 1.0,
        "image": hint(),
        **fields,
    }


def with_units(*units):
    return {"alwayson_scripts": {"controlnet": {"args": list(units)}}}


def run(engine, files, params, checkpoint="tiny.safetensors", nets=("cn.safetensors", "cn2.safetensors")):
    request = make_request(files, "c", params, types=("Stable-diffusion",), checkpoint=checkpoint)
    for name in nets:
        model(files, request, "ControlNet", f"c-{name}", name)
    return engine.run([engine.prepare("c", request)])[0]


def image(engine, files, params, **kw):
    return pixels(run(engine, files, params, **kw)["images"][0]).astype(int)


@pytest.fixture
def residuals(monkeypatch):
    """Every ControlNet residual list the UNet receives (the 12 or 6 down residuals, then the middle one)."""
    from diffusers import UNet2DConditionModel

    seen = []
    original = UNet2DConditionModel.forward

    def forward(self, *args, **kwargs):
        down = kwargs.get("down_block_additional_residuals")
        if down is not None:
            seen.append([r.clone() for r in (*down, kwargs["mid_block_additional_residual"])])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    return seen


def test_an_enabled_unit_changes_the_image_and_weight_0_or_disabled_is_none(engine, files):
    plain = image(engine, files, BASE)
    controlled = image(engine, files, {**BASE, **with_units(unit())})
    assert abs(controlled - plain).mean() > 1
    assert (image(engine, files, {**BASE, **with_units({**unit(), "weight": 0})}) == plain).all()
    assert (image(engine, files, {**BASE, **with_units({**unit(), "enabled": False})}) == plain).all()
    info = json.loads(run(engine, files, {**BASE, **with_units(unit())})["info"])
    assert 'ControlNet 0: "Module: none, Model: cn.safetensors, Weight: 1' in info["infotexts"][0]
    # "invert" is the inverted map: a different control, a different image
    inverted = image(engine, files, {**BASE, **with_units({**unit(), "module": "invert"})})
    assert (inverted != controlled).any()  # the tiny random ControlNet responds to its map only faintly


def test_guidance_end_stops_the_control_at_a1111s_step(engine, files, monkeypatch):
    from diffusers import ControlNetModel

    scales = []
    original = ControlNetModel.forward

    def forward(self, *args, **kwargs):  # diffusers runs the ControlNet every step, at scale 0 when inactive
        scales.append(float(kwargs["conditioning_scale"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ControlNetModel, "forward", forward)
    image(engine, files, {**BASE, **with_units({**unit(), "guidance_end": 0.5})})
    assert scales == [1.0, 1.0, 1.0, 0.0]  # A1111: active while i / 4 <= 0.5, i.e. steps 0, 1 and 2
    scales.clear()
    image(engine, files, {**BASE, **with_units({**unit(), "guidance_start": 0.5})})
    assert scales == [0.0, 0.0, 1.0, 1.0]  # and while i / 4 >= 0.5


def test_two_units_combine(engine, files):
    first = image(engine, files, {**BASE, **with_units(unit())})
    second = image(engine, files, {**BASE, **with_units({**unit(), "model": "cn2.safetensors"})})
    both = image(engine, files, {**BASE, **with_units(unit(), {**unit(), "model": "cn2.safetensors"})})
    assert abs(both - first).mean() > 0.5 and abs(both - second).mean() > 0.5


def test_img2img_and_sdxl_take_units_too(engine, files):
    source = hint()
    params = {**BASE, "init_images": [source], "denoising_strength": 0.7}
    request = make_request(files, "i", params, task="img2img", types=("Stable-diffusion",))
    plain = pixels(engine.run([engine.prepare("i", request)])[0]["images"][0]).astype(int)
    request = make_request(files, "i", {**params, **with_units({**unit(), "image": None})}, task="img2img")
    model(files, request, "ControlNet", "c-cn", "cn.safetensors")
    controlled = pixels(engine.run([engine.prepare("i", request)])[0]["images"][0]).astype(int)
    assert abs(controlled - plain).mean() > 0.5  # the unit without an image controls with the init image

    xl = {**BASE, "width": 64, "height": 64}
    plain_xl = image(engine, files, xl, checkpoint="xl.safetensors", nets=())
    cn_xl = {**unit(), "model": "cnxl.safetensors"}
    controlled_xl = image(
        engine, files, {**xl, **with_units(cn_xl)}, checkpoint="xl.safetensors", nets=("cnxl.safetensors",)
    )
    assert abs(controlled_xl - plain_xl).mean() > 0.5
    zero = {**xl, **with_units({**cn_xl, "weight": 0})}
    assert (image(engine, files, zero, checkpoint="xl.safetensors", nets=("cnxl.safetensors",)) == plain_xl).all()


def test_refusals_name_the_module_or_the_missing_model(engine, files):
    with pytest.raises(
        JobError, match='module "depth_midas" is not supported by this runtime; use one of: blur_gaussian, canny'
    ):
        run(engine, files, {**BASE, **with_units({**unit(), "module": "depth_midas"})})
    with pytest.raises(JobError, match="ControlNet unit 0: model gone was not sent with the job"):
        run(engine, files, {**BASE, **with_units({**unit(), "model": "gone"})})
    with pytest.raises(JobError, match="does not fit this checkpoint"):
        run(engine, files, {**BASE, **with_units({**unit(), "model": "cnxl.safetensors"})}, nets=("cnxl.safetensors",))
    with pytest.raises(JobError, match="txt2img needs the unit's image"):
        run(engine, files, {**BASE, **with_units({**unit(), "image": None})})


def test_the_control_plane_sends_the_units_models():
    params = with_units(unit(), {**unit(), "model": "other [f00]"}, {**unit(), "enabled": False, "model": "off"})
    assert named_models("txt2img", params) == {"ControlNet": ["cn.safetensors", "other"]}


def test_a_canny_unit_controls_with_the_edges_of_its_image(engine, files):
    plain_unit = image(engine, files, {**BASE, **with_units(unit())})
    canny = image(engine, files, {**BASE, **with_units({**unit(), "module": "canny", "threshold_a": 50})})
    assert (canny != plain_unit).any()
    info = json.loads(run(engine, files, {**BASE, **with_units({**unit(), "module": "canny"})})["info"])
    assert "Module: canny" in info["infotexts"][0]


def test_control_modes_scale_the_residuals_and_controlnet_first_leaves_the_negative_prediction_alone(
    engine, files, residuals
):
    """The extension's modes: "My prompt is more important" scales residual i of n (13 for SD 1.5, 7 for the tiny
    UNet) by 0.825^(n-1-i) on both halves of the CFG batch; "ControlNet is more important" does so on the prompt's half only. Checked on the residuals
    the UNet receives, against the Balanced run's, and on the images."""
    import torch

    from gpu_runtime.controlnet import layer_scales

    seen = residuals
    params = {**BASE, "steps": 1}
    balanced = image(engine, files, {**params, **with_units(unit())})
    plain_residuals = seen.pop()
    count = len(plain_residuals)
    assert count == 7 and not seen
    prompt_first = image(engine, files, {**params, **with_units({**unit(), "control_mode": 1})})
    for got, want, scale in zip(seen.pop(), plain_residuals, layer_scales(count), strict=True):
        assert torch.allclose(got, want * scale, atol=1e-6)
    control_first = image(
        engine, files, {**params, **with_units({**unit(), "control_mode": "ControlNet is more important"})}
    )
    for got, want, scale in zip(seen.pop(), plain_residuals, layer_scales(count), strict=True):
        half = got.shape[0] // 2  # diffusers' CFG batch: the negative prompt's half first
        assert (got[:half] == 0).all() and torch.allclose(got[half:], want[half:] * scale, atol=1e-6)
    assert layer_scales(13)[0] == 0.825**12 and layer_scales(13)[-1] == 1.0
    assert (prompt_first != balanced).any() and (control_first != prompt_first).any()
    engine_hooks = [net._forward_hooks for net in engine.controlnets.values()]
    assert all(not hooks for hooks in engine_hooks)  # removed: the cached model serves later jobs unchanged
    assert (image(engine, files, {**params, **with_units(unit())}) == balanced).all()


def test_a_shuffle_model_is_pooled_and_leaves_the_negative_prediction_alone(engine, files, residuals):
    """The extension's global average pooling, for a ControlNet whose file name says shuffle: every residual is
    averaged over height and width and kept off the negative prompt's half. The same file under another name is
    the Balanced run the pooled residuals are checked against."""
    import torch

    seen = residuals
    params = {**BASE, "steps": 1}
    plain = image(engine, files, {**params, **with_units(unit())})
    plain_residuals = seen.pop()
    request = make_request(files, "c", {**params, **with_units({**unit(), "model": "control_v11e_sd15_shuffle"})})
    model(files, request, "ControlNet", "c-shuffle", "control_v11e_sd15_shuffle.safetensors", "cn.safetensors")
    pooled = pixels(engine.run([engine.prepare("c", request)])[0]["images"][0]).astype(int)
    for got, want in zip(seen.pop(), plain_residuals, strict=True):
        half = got.shape[0] // 2
        assert got.shape[2:] == (1, 1) and (got[:half] == 0).all()
        assert torch.allclose(got[half:], want[half:].mean(dim=(2, 3), keepdim=True), atol=1e-6)
    assert (pooled != plain).any()


def test_control_modes_are_refused_with_sdxl(engine, files):
    cn_xl = {**unit(), "model": "cnxl.safetensors", "control_mode": 1}
    with pytest.raises(JobError, match="control modes other than Balanced are not supported with SDXL"):
        run(engine, files, {**BASE, **with_units(cn_xl)}, checkpoint="xl.safetensors", nets=("cnxl.safetensors",))
