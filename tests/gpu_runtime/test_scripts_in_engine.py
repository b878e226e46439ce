"""The x/y/z plot script and the Dynamic Prompts extension run by the engine on the tiny models (issue 12)."""

import base64
import io
import json

import pytest

pytest.importorskip("diffusers")

from PIL import Image

from gpu_runtime.errors import JobError
from tests.gpu_runtime.a1111_payloads import ALWAYSON_OFF, TXT2IMG, payload
from tests.gpu_runtime.conftest import make_request, model, pixels

BASE = {"prompt": "a photo of a cat", "seed": 8, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}


def run(engine, files, params, **kw):
    request = make_request(files, "s", params, types=("Stable-diffusion",), **kw)
    return engine.run([engine.prepare("s", request)])[0]


def alone(engine, files, **changes):
    return pixels(run(engine, files, {**BASE, **changes})["images"][0])


def test_a_2x2_xyz_plot_returns_the_grid_and_four_cells_with_their_settings(engine, files):
    # 15-argument layout (what ESD's client sends): X = Steps "2,3", Y = Seed "8,9", lone images included
    args = [4, "2,3", [], 1, "8,9", [], 0, "", [], True, True, False, False, 0, False]
    output = run(engine, files, {**BASE, "script_name": "x/y/z plot", "script_args": args})
    info = json.loads(output["info"])
    assert len(output["images"]) == 5 and info["index_of_first_image"] == 1
    grid = Image.open(io.BytesIO(base64.b64decode(output["images"][0])))
    assert grid.width >= 128 and grid.height >= 128  # 2x2 cells of 64 (plus the legend)
    assert "Script: X/Y/Z plot" in info["infotexts"][0] and 'X Values: "2,3"' in info["infotexts"][0]
    expected = [(2, 8), (3, 8), (2, 9), (3, 9)]  # x inner, y outer, as A1111 orders the cells
    for (steps, seed), encoded, text in zip(expected, output["images"][1:], info["infotexts"][1:], strict=True):
        assert f"Steps: {steps}," in text and f"Seed: {seed}," in text
        assert (pixels(encoded) == alone(engine, files, steps=steps, seed=seed)).all()
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).info["parameters"] == text


def test_esd_xyz_checkpoint_payload_runs_each_checkpoint(engine, files):
    args = [11, "", ["tiny.safetensors", "other.safetensors"], 4, "1,2", [], 0, "", [], True, False, False, False]
    args += [0, False]
    params = payload(TXT2IMG, **BASE, script_name="x/y/z plot", script_args=args, alwayson_scripts=ALWAYSON_OFF)
    request = make_request(files, "x", params, types=("Stable-diffusion",))
    model(files, request, "Stable-diffusion", "c-other", "other.safetensors")
    output = engine.run([engine.prepare("x", request)])[0]
    info = json.loads(output["info"])
    assert len(output["images"]) == 1  # the grid only (include_lone_images off)
    assert "X Type: Checkpoint name" in info["infotexts"][0] and "Y Type: Steps" in info["infotexts"][0]
    assert info["xyz_cells"] == 4


def test_xyz_axes_are_checked_like_jobs(engine, files):
    args = [12, "0.1,0.2", [], 0, "", [], 0, "", [], True, False, False, False, 0, False]  # Neg. Guidance min sigma
    with pytest.raises(JobError, match=r"x/y/z plot cell 1: s_min_uncond=0\.1 is not supported"):
        run(engine, files, {**BASE, "script_name": "x/y/z plot", "script_args": args})
    with pytest.raises(JobError, match="x/y/z plot"):
        run(engine, files, {**BASE, "script_name": "x/y/z plot", "script_args": [4, "1"]})


def test_dynamic_prompts_give_each_image_a_variant(engine, files):
    scripts = {"dynamic prompts v2.17.0": {"args": [True]}}
    output = run(engine, files, {**BASE, "prompt": "a {red|blue} car", "batch_size": 4, "alwayson_scripts": scripts})
    info = json.loads(output["info"])
    assert set(info["all_prompts"]) <= {"a red car", "a blue car"} and len(info["all_prompts"]) == 4
    assert info["all_seeds"] == [8, 9, 10, 11]
    first = info["all_prompts"][0]
    assert (pixels(output["images"][0]) == alone(engine, files, prompt=first)).all()
    combinatorial = [True, True]
    scripts = {"dynamic prompts v2.17.0": {"args": combinatorial}}
    output = run(engine, files, {**BASE, "prompt": "{red|blue} {car|boat}", "alwayson_scripts": scripts})
    assert sorted(json.loads(output["info"])["all_prompts"]) == ["blue boat", "blue car", "red boat", "red car"]
    with pytest.raises(JobError, match="__colors__"):
        run(engine, files, {**BASE, "prompt": "a __colors__ car", "alwayson_scripts": scripts})
