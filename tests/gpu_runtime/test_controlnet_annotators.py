"""ControlNet preprocessors with annotator weights (issue 14): hed, hed_safe, scribble_hed, lineart (realistic) and
lineart_coarse run from files uploaded as ControlNetAnnotator checkpoints, named as the extension downloads them;
without the file the job is refused naming the module and the file. Random-weight networks of the published
architectures stand in; each map is checked against the extension's definition around the network."""

import base64
import io

import numpy as np
import pytest

pytest.importorskip("controlnet_aux")

import cv2
import torch
from PIL import Image

from gpu_runtime import controlnet_annotators as annotators
from gpu_runtime import controlnet_preprocessors as pre
from gpu_runtime.errors import JobError
from gpu_runtime.protocol.scripts import named_models
from tests.gpu_runtime.conftest import make_request, model, pixels

BASE = {"prompt": "a photo of a cat", "seed": 8, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def annotator_files(tiny_dir):
    from gpu_runtime.tiny import write_tiny_annotator

    write_tiny_annotator(tiny_dir / "ControlNetHED.pth", "hed")
    write_tiny_annotator(tiny_dir / "sk_model.pth", "lineart", seed=1)
    write_tiny_annotator(tiny_dir / "sk_model2.pth", "lineart", seed=2)
    return tiny_dir


def drawing() -> np.ndarray:
    image = np.full((64, 64, 3), 230, dtype=np.uint8)
    cv2.circle(image, (32, 32), 18, (20, 40, 60), 3)
    return image


def test_hed_is_the_sigmoid_of_the_mean_side_output(annotator_files):
    from controlnet_aux.hed import ControlNetHED_Apache2

    net = ControlNetHED_Apache2()
    net.load_state_dict(torch.load(annotator_files / "ControlNetHED.pth", weights_only=True))
    image = drawing()
    with torch.no_grad():
        sides = [s[0, 0].numpy() for s in net.float().eval()(torch.from_numpy(image).float().permute(2, 0, 1)[None])]
    mean = np.mean(np.stack([cv2.resize(s, (64, 64), interpolation=cv2.INTER_LINEAR) for s in sides], axis=2), axis=2)
    expected = ((1 / (1 + np.exp(-mean.astype(np.float64)))) * 255).clip(0, 255).astype(np.uint8)
    path = annotator_files / "ControlNetHED.pth"
    hed = pre.run("hed", image, 64, -1, -1, annotator=path)  # 64 px: no resampling, no padding
    assert hed.shape == (64, 64, 3) and np.array_equal(hed[:, :, 0], expected)
    safe = pre.run("hed_safe", image, 64, -1, -1, annotator=path)
    assert set(np.unique(safe)) <= {0, 127, 255}  # three levels
    scribble = pre.run("scribble_hed", image, 64, -1, -1, annotator=path)
    assert set(np.unique(scribble)) <= {0, 255} and np.array_equal(scribble[:, :, 0], annotators.scribble(hed[:, :, 0]))


def test_lineart_is_the_inverted_generator_output(annotator_files):
    from controlnet_aux.lineart import Generator

    image = drawing()
    for module, name in (("lineart", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")):
        net = Generator(3, 1, 3)
        net.load_state_dict(torch.load(annotator_files / name, weights_only=True))
        with torch.no_grad():
            line = net.eval()((torch.from_numpy(image).float() / 255).permute(2, 0, 1)[None])[0][0].numpy()
        expected = 255 - (line * 255.0).clip(0, 255).astype(np.uint8)
        assert np.array_equal(pre.run(module, image, 64, -1, -1, annotator=annotator_files / name)[:, :, 0], expected)
    realistic = pre.run("lineart", image, 64, -1, -1, annotator=annotator_files / "sk_model.pth")
    coarse = pre.run("lineart_coarse", image, 64, -1, -1, annotator=annotator_files / "sk_model2.pth")
    assert not np.array_equal(realistic, coarse)  # each module reads its own file


def test_a_unit_runs_its_annotator_from_the_uploaded_file_or_is_refused_naming_it(engine, files, annotator_files):
    buffer = io.BytesIO()
    Image.fromarray(drawing()).save(buffer, format="PNG")
    unit = {"module": "softedge_hed", "model": "cn", "image": base64.b64encode(buffer.getvalue()).decode()}
    params = {**BASE, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    request = make_request(files, "a", params, types=("Stable-diffusion",))
    model(files, request, "ControlNet", "c-cn.safetensors", "cn.safetensors")
    with pytest.raises(JobError, match=r"ControlNet unit 0: module hed needs the annotator file ControlNetHED\.pth"):
        engine.prepare("a", request)
    model(files, request, "ControlNetAnnotator", "a-hed", "ControlNetHED.pth")
    output = engine.run([engine.prepare("a", request)])[0]
    assert pixels(output["images"][0]).shape == (64, 64, 3)
    assert named_models("txt2img", params) == {"ControlNet": ["cn"], "ControlNetAnnotator": ["ControlNetHED.pth"]}
