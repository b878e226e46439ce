"""The weight-free ControlNet preprocessors against their definitions (sd-webui-controlnet's processor.py)."""

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from gpu_runtime import controlnet_preprocessors as pre  # noqa: E402


def step(low: int, high: int, size: int = 64) -> np.ndarray:
    image = np.full((size, size, 3), low, dtype=np.uint8)
    image[:, size // 2 :] = high
    return image


def test_canny_finds_the_edge_and_obeys_its_thresholds():
    edges = pre.run("canny", step(0, 255), 64, 100, 200)  # processor_res = the image's size: no resampling
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    columns = sorted(set(np.nonzero(edges[:, :, 0])[1]))
    assert columns and all(30 <= c <= 33 for c in columns)  # only along the boundary
    # a 40-level step has a Sobel magnitude of 160: between 100 and 200 it is only a weak edge - none is kept
    assert pre.run("canny", step(100, 140), 64, 100, 200).max() == 0
    assert pre.run("canny", step(100, 140), 64, 50, 100).max() == 255
    # -1 means the extension's defaults (512 px, 100/200): the map comes back at the input's size
    assert pre.settings("canny", -1, -1, -1) == (512, 100.0, 200.0)
    assert pre.run("canny", step(0, 255, 96), -1, -1, -1).shape == (512, 512, 3)


def test_threshold_keeps_pixels_whose_every_channel_is_above_it():
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    ramp[:, 40, 1] = 0  # one dark channel: below the threshold
    result = pre.run("threshold", ramp, 64, 127, -1)
    expected = np.where(ramp.min(axis=2) > 127, 255, 0)
    assert (result[:, :, 0] == expected).all() and (result[:, 40] == 0).all()


def test_blur_spreads_a_point_by_sigma_and_tile_resample_downsamples():
    point = np.zeros((64, 64, 3), dtype=np.uint8)
    point[32, 32] = 255
    narrow, wide = pre.run("blur_gaussian", point, 64, 1.0, -1), pre.run("blur_gaussian", point, 64, 4.0, -1)
    assert (wide > 0).sum() > (narrow > 0).sum() > 1 and narrow[32, 32].max() > wide[32, 32].max()
    assert (narrow == cv2.GaussianBlur(point, (0, 0), 1.0)).all()
    assert pre.run("tile_resample", step(0, 255), -1, 2.0, -1).shape == (32, 32, 3)
    assert (pre.run("tile_resample", step(0, 255), -1, 1.0, -1) == step(0, 255)).all()  # below 1.1: as is
    assert pre.settings("tile_resample", -1, -1, -1) == (-1, 1.0, -1.0)  # no resolution slider: -1 passes through


def test_resolution_and_pixel_perfect_follow_the_extension():
    wide = np.zeros((60, 100, 3), dtype=np.uint8)
    assert pre.run("threshold", wide, 512, 127, -1).shape == (512, 853, 3)  # the short side becomes 512
    assert pre.pixel_perfect_resolution((60, 100), (512, 512), 1) == round(512 / 60 * 60)
    assert pre.pixel_perfect_resolution((60, 100), (512, 512), 2) == round(512 / 100 * 60)
    assert (pre.run("invert", step(0, 255), -1, -1, -1) == 255 - step(0, 255)).all()


def test_scribble_xdog_and_lineart_mark_dark_lines_on_light_ground():
    drawing = np.full((128, 128, 3), 255, dtype=np.uint8)
    drawing[:, 60:64] = 0  # one dark vertical line
    scribble = pre.run("scribble_xdog", drawing, 128, -1, -1)  # default threshold 32
    assert set(np.unique(scribble)) <= {0, 255} and scribble[:, 58:66].max() == 255 and scribble[:, :40].max() == 0
    assert pre.run("scribble_xdog", drawing, 128, 510, -1).max() == 0  # 2 * (255 - dog) never exceeds 510
    lines = pre.run("lineart_standard", drawing, 128, -1, -1)
    assert lines[:, 61].min() > 100 and lines[:, :30].max() == 0  # the line is bright, the paper black
    assert pre.run("lineart_standard", np.full((64, 64, 3), 200, np.uint8), 64, -1, -1).max() == 0


def test_shuffle_moves_every_pixel_along_a_seeded_smooth_flow():
    """The content shuffle samples the image at a smooth random place: on a picture whose red is its x and green
    its y, the map's red and green are the flow itself - spanning the whole image, smooth, fixed by the seed."""
    y, x = np.mgrid[0:64, 0:96]
    ramps = np.stack([x * 2, y * 2, np.full_like(x, 7)], axis=-1).astype(np.uint8)  # 2 levels per pixel
    shuffled = pre.run("shuffle", ramps, 64, -1, -1, seed=16).astype(int)  # short side 64: no resampling
    assert shuffled.shape == (64, 96, 3) and (shuffled[:, :, 2] == 7).all()  # colours kept, layout not
    flow_x, flow_y = shuffled[:, :, 0] / 2, shuffled[:, :, 1] / 2
    assert flow_x.min() <= 0.5 and flow_x.max() >= 94.5  # min-max normalised noise reaches both edges
    assert flow_y.min() <= 0.5 and flow_y.max() >= 62.5
    assert np.abs(np.diff(flow_x, axis=1)).max() < 6 and np.abs(np.diff(flow_y, axis=0)).max() < 6  # smooth
    assert not np.array_equal(flow_x, np.tile(np.arange(96), (64, 1)))  # moved
    assert np.array_equal(pre.run("shuffle", ramps, 64, -1, -1, seed=16), shuffled)
    assert not np.array_equal(pre.run("shuffle", ramps, 64, -1, -1, seed=17), shuffled)
    assert pre.settings("shuffle", -1, -1, -1)[0] == 512


def test_the_shuffle_seed_is_the_requests_seed_plus_subseed_as_the_extension_seeds_numpy():
    from gpu_runtime.controlnet import preprocessor_seed

    assert preprocessor_seed({"seed": 8}, 8) == 16  # the subseed -1 counts as the first image's seed
    assert preprocessor_seed({"seed": -1, "subseed": 5}, 1234) == 1239
    assert preprocessor_seed({"seed": 2**32 - 1, "subseed": 2}, 0) == 1
