"""The rembg task (issue 14): the rembg extension's API on an uploaded ONNX model of type rembg. The tiny model's
mask is the image's red channel, so the cut is known: a red subject on black stays, the black goes."""

import base64
import io

import numpy as np
import pytest

pytest.importorskip("rembg")

from PIL import Image

from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import named_models
from tests.gpu_runtime.conftest import make_request, model


def subject() -> str:
    """A red subject on the left half of a black picture."""
    picture = np.zeros((64, 96, 3), np.uint8)
    picture[:, :48] = (255, 30, 0)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def rembg(engine, files, params, sent=("u2net.onnx",)):
    request = make_request(files, "r", {"input_image": subject(), **params}, task="rembg", types=())
    for name in sent:
        model(files, request, "rembg", f"rm-{name}", name, "u2net.onnx")
    output = engine.run([engine.prepare("r", request)])[0]
    return Image.open(io.BytesIO(base64.b64decode(output["image"])))


def test_the_uploaded_model_decides_the_cut(engine, files):
    cut = rembg(engine, files, {})
    assert cut.mode == "RGBA" and cut.size == (96, 64)
    rgba = np.asarray(cut)
    assert (rgba[:, :44, 3] == 255).all() and (rgba[:, 52:, 3] == 0).all()  # away from the resized edge
    assert (rgba[:, :44, :3] == (255, 30, 0)).all()

    mask = rembg(engine, files, {"return_mask": True})  # the extension's return_mask: rembg's only_mask
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), rgba[:, :, 3])

    matted = np.asarray(rembg(engine, files, {"alpha_matting": True, "alpha_matting_erode_size": 4}))
    assert (matted[:, 52:, 3] == 0).all() and not np.array_equal(matted[:, 40:56, 3], rgba[:, 40:56, 3])

    anime = np.asarray(rembg(engine, files, {"model": "isnet-anime"}, sent=("isnet-anime.onnx",)))
    assert (anime[:, :44, 3] == 255).all() and (anime[:, 52:, 3] == 0).all()  # ISNet's session, same network


def test_refusals_name_the_model_or_the_value(engine, files):
    with pytest.raises(JobError, match="rembg model isnet-anime needs a checkpoint of type rembg with a file"):
        rembg(engine, files, {"model": "isnet-anime"})  # only u2net.onnx was sent
    with pytest.raises(JobError, match="rembg model birefnet-general is not supported by this runtime; use one of"):
        rembg(engine, files, {"model": "birefnet-general"})
    with pytest.raises(JobError, match="return_mask must be true or false"):
        rembg(engine, files, {"return_mask": "yes"})
    with pytest.raises(JobError, match="alpha_matting_erode_size must be a number between 0 and 255"):
        rembg(engine, files, {"alpha_matting": True, "alpha_matting_erode_size": 500})


def test_the_control_plane_sends_the_named_model():
    assert named_models("rembg", {"input_image": ""}) == {"rembg": ["u2net"]}
    assert named_models("rembg", {"model": "isnet-anime"}) == {"rembg": ["isnet-anime"]}
    assert named_models("rembg", {"model": "u2net_cloth_seg"}) == {}  # refused by the runtime, by name
