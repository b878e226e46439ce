"""Model upscalers (issue 14): uploaded ESRGAN-type files run by spandrel as A1111 v1.8.0 runs them, in extras
and in the hires fix. Tiny random RRDBNet (4x) and SRVGGNetCompact (2x) models stand in for real ones; A1111's
algorithm is rebuilt here from its definition (model on BGR in [0, 1], passes until the target is covered,
Lanczos to the size floored to 8) with spandrel's model called directly, so equalities are exact."""

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("spandrel")

from PIL import Image

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import named_models
from tests.gpu_runtime.conftest import make_request, model, pixels, png_size

BASE = {"prompt": "a photo of a cat", "seed": 8, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def source(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth test picture (gradients and a disc), so upscalers differ in what they do with edges."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 3) ** 2) * 120
    noise = np.random.RandomState(seed).randint(0, 30, (height, width))
    rgb = np.stack([x * 255 // width, y * 255 // height, disc + noise], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def extras(engine, files, params, nets=("4x-Tiny.pth",), task="extra-single-image"):
    request = make_request(files, "x", params, task=task, types=())
    for name in nets:
        model(files, request, "ESRGAN", f"u-{name}", name)
    return engine.run([engine.prepare("x", request)])[0]


def descriptor(tiny_dir, name):
    import spandrel

    return spandrel.ModelLoader(device="cpu").load_from_file(str(tiny_dir / name))


def direct(net, image: Image.Image) -> Image.Image:
    """The model on a whole image, untiled, as A1111's ``upscale_without_tiling`` feeds it (BGR, [0, 1])."""
    import torch

    array = np.array(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1) / 255
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(array)).float().unsqueeze(0))
    out = (255.0 * out.squeeze(0).clamp(0, 1).numpy().transpose(1, 2, 0)).astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(out))


def test_a_4x_model_runs_once_for_scale_2_then_lanczos_to_the_size_floored_to_8(engine, files, tiny_dir):
    image = source(192, 192)  # exactly one 192 px tile: tiled == untiled
    out = extras(engine, files, {"image": b64(image), "upscaler_1": "4x-Tiny", "upscaling_resize": 2.1})
    assert png_size(out["image"]) == (400, 400)  # int(192 * 2.1) = 403 -> 400
    expected = direct(descriptor(tiny_dir, "4x-Tiny.pth"), image).resize((400, 400), Image.Resampling.LANCZOS)
    assert (pixels(out["image"]) == np.asarray(expected)).all()
    lanczos = extras(engine, files, {"image": b64(image), "upscaler_1": "Lanczos", "upscaling_resize": 2.1}, nets=())
    assert abs(pixels(out["image"]) - pixels(lanczos["image"])).mean() > 10  # the model, not a resize
    assert out["html_info"] == "Postprocess upscale by: 2.1, Postprocess upscaler: 4x-Tiny"


def test_a_2x_model_runs_until_the_target_is_covered(engine, files, tiny_dir):
    image = source(48, 40)  # smaller than a tile: A1111 pads the tile with black, so compare tiled with tiled
    from gpu_runtime.upscalers import model_pass

    net = descriptor(tiny_dir, "realesr-general-x4v3.pth")
    once = model_pass(net)
    out = extras(
        engine,
        files,
        {"image": b64(image), "upscaler_1": "R-ESRGAN General 4xV3", "upscaling_resize": 4},
        nets=("realesr-general-x4v3.pth",),
    )  # the built-in name stands for its file; a 2x model: two passes for 4x
    assert png_size(out["image"]) == (192, 160)
    assert (pixels(out["image"]) == np.asarray(once(once(image)))).all()
    assert once(image).size == (96, 80)


def test_tiles_cover_a_large_image_and_agree_with_an_untiled_run_away_from_the_seams(tiny_dir):
    from gpu_runtime.upscalers import model_pass

    net = descriptor(tiny_dir, "4x-Tiny.pth")
    image = source(400, 200, seed=3)
    tiled = np.asarray(model_pass(net)(image)).astype(int)
    untiled = np.asarray(direct(net, image)).astype(int)
    assert tiled.shape == untiled.shape == (800, 1600, 3)
    # Tiles start at x = 0, 104, 208 (A1111's even spacing) and y = 0, 8: far from every tile edge the
    # receptive field is inside the tile, so the pixels are the untiled ones; near seams the blend differs.
    assert abs(tiled[100:300, 100:300] - untiled[100:300, 100:300]).max() <= 1
    assert (tiled != untiled).any()


@pytest.mark.parametrize(
    ("params", "size"),
    [
        ({"resize_mode": 0, "upscaling_resize": 1.5}, (96, 72)),
        ({"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100}, (100, 100)),  # cover + crop
        ({"resize_mode": 1, "upscaling_resize_w": 100, "upscaling_resize_h": 100, "upscaling_crop": False}, (128, 96)),
    ],
)
def test_every_resize_mode_gives_a1111s_size(engine, files, params, size):
    image = source(64, 48)
    out = extras(engine, files, {"image": b64(image), "upscaler_1": "4x-Tiny", **params})
    assert png_size(out["image"]) == size


def test_upscaler_2_is_blended_by_its_visibility_and_batches_take_every_image(engine, files):
    image = source(64, 64)
    params = {"upscaler_1": "Lanczos", "upscaling_resize": 2}
    plain = pixels(extras(engine, files, {"image": b64(image), **params})["image"])
    model_only = pixels(extras(engine, files, {"image": b64(image), **params, "upscaler_1": "4x-Tiny"})["image"])
    mixed = {**params, "upscaler_2": "4x-Tiny", "extras_upscaler_2_visibility": 0.5}
    blended = extras(engine, files, {"image": b64(image), **mixed})
    expected = Image.blend(Image.fromarray(plain.astype(np.uint8)), Image.fromarray(model_only.astype(np.uint8)), 0.5)
    assert (pixels(blended["image"]) == np.asarray(expected)).all()
    assert blended["html_info"].endswith("Postprocess upscaler 2: 4x-Tiny")
    batch = extras(
        engine,
        files,
        {"imageList": [{"data": b64(image), "name": "a"}, {"data": b64(source(32, 48)), "name": "b"}], **mixed},
        task="extra-batch-images",
    )
    assert [png_size(i) for i in batch["images"]] == [(128, 128), (64, 96)]
    assert (pixels(batch["images"][0]) == pixels(blended["image"])).all()


def test_hires_fix_with_a_model_upscaler(engine, files):
    params = {**BASE, "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.5, "hr_second_pass_steps": 2}

    def hires(upscaler, nets=()):
        request = make_request(files, "h", {**params, "hr_upscaler": upscaler}, types=("Stable-diffusion",))
        for name in nets:
            model(files, request, "ESRGAN", f"u-{name}", name)
        return engine.run([engine.prepare("h", request)])[0]

    with_model = hires("4x-Tiny", ("4x-Tiny.pth",))
    lanczos = hires("Lanczos")
    assert png_size(with_model["images"][0]) == (128, 128)
    assert abs(pixels(with_model["images"][0]) - pixels(lanczos["images"][0])).mean() > 1
    assert "Hires upscaler: 4x-Tiny" in json.loads(with_model["info"])["infotexts"][0]
    with pytest.raises(JobError, match="hr_upscaler 4x-Other is neither built in \\(Latent, "):
        hires("4x-Other", ("4x-Tiny.pth",))


def test_refusals_name_the_upscaler_or_the_file(engine, files):
    image = b64(source(32, 32))
    with pytest.raises(JobError, match="upscaler R-ESRGAN 4x\\+ is neither built in \\(None, Lanczos, Nearest\\)"):
        extras(engine, files, {"image": image, "upscaler_1": "R-ESRGAN 4x+"})
    request = make_request(files, "x", {"image": image, "upscaler_1": "cn"}, task="extra-single-image", types=())
    model(files, request, "ESRGAN", "u-cn", "cn.safetensors")  # a ControlNet uploaded as ESRGAN
    with pytest.raises(JobError, match=r"ESRGAN model cn\.safetensors: spandrel does not recognise its architecture"):
        engine.run([engine.prepare("x", request)])


def test_the_control_plane_sends_the_named_upscalers_by_file_stem():
    assert named_models("extra-single-image", {"upscaler_1": "4x-Tiny [ab12]", "upscaler_2": "R-ESRGAN 4x+"}) == {
        "ESRGAN": ["4x-Tiny", "RealESRGAN_x4plus"]
    }
    assert named_models("extra-batch-images", {"upscaler_1": "Lanczos", "upscaler_2": "None"}) == {}
    hires = {"enable_hr": True, "hr_upscaler": "SwinIR 4x"}
    assert named_models("txt2img", hires) == {"ESRGAN": ["SwinIR_4x"]}
    assert named_models("txt2img", {**hires, "enable_hr": False}) == {}
    assert named_models("txt2img", {**hires, "hr_upscaler": "Latent (nearest)"}) == {}


def test_a_pt_file_is_read_as_tensors_only(tmp_path, tiny_dir):
    """spandrel would run a ``.pt`` file as TorchScript; an uploaded one is loaded with ``weights_only``."""
    import torch

    from gpu_runtime.upscalers import load_descriptor

    state = torch.load(tiny_dir / "4x-Tiny.pth", weights_only=True)
    torch.save({"params_ema": state}, tmp_path / "4x-Tiny.pt")  # BasicSR's layout
    loaded = load_descriptor(tmp_path / "4x-Tiny.pt", "ESRGAN", "cpu", torch.float32)
    assert (loaded.architecture.name, loaded.scale) == ("ESRGAN", 4)
    image = source(32, 32)
    assert (np.asarray(direct(loaded, image)) == np.asarray(direct(descriptor(tiny_dir, "4x-Tiny.pth"), image))).all()
