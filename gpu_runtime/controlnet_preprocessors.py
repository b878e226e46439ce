"""The ControlNet preprocessors that need no weights, as sd-webui-controlnet defines them (``scripts/processor.py``
at the commit ESD installs): the input is resized so its short side is the processor resolution (bicubic up,
area down) and padded to a multiple of 64, processed, and the padding removed.

Kept apart from ``gpu_runtime.controlnet`` because each preprocessor is its own definition to match; hed and
lineart run their networks from uploaded annotator files (``gpu_runtime.controlnet_annotators``); the others that
need weights (depth, openpose, ...) are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_runtime.protocol.scripts import ANNOTATOR_FILES


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor's slider defaults (``None``: it has no such slider; the extension then passes -1 through)."""

    resolution: int | None
    threshold_a: float | None
    threshold_b: float | None


PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(None, None, None),
    "invert": Preprocessor(None, None, None),
    "canny": Preprocessor(512, 100, 200),
    "threshold": Preprocessor(512, 127, None),
    "blur_gaussian": Preprocessor(512, 9.0, None),
    "tile_resample": Preprocessor(None, 1.0, None),
    "scribble_xdog": Preprocessor(512, 32, None),
    "lineart_standard": Preprocessor(512, None, None),
    "shuffle": Preprocessor(512, None, None),  # v1.1.444+ fixes it at 512; older versions passed -1 through
    # gpu_runtime.controlnet_annotators: from an uploaded annotator file
    "hed": Preprocessor(512, None, None),
    "hed_safe": Preprocessor(512, None, None),
    "scribble_hed": Preprocessor(512, None, None),
    "lineart": Preprocessor(512, None, None),
    "lineart_coarse": Preprocessor(512, None, None),
}
SHUFFLE_NOISE_SCALE = 256  # the content shuffle's noise cell, in pixels


def _hwc3(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        return np.concatenate([image] * 3, axis=2)
    return image[:, :, :3]


def _resize_with_pad(image: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    import cv2

    height, width = image.shape[:2]
    k = float(resolution) / float(min(height, width))
    target_h, target_w = int(np.round(height * k)), int(np.round(width * k))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    resized = cv2.resize(image, (target_w, target_h), interpolation=interpolation)
    pad_h, pad_w = -target_h % 64, -target_w % 64
    padded = np.pad(resized, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")
    return padded, (target_h, target_w)


def settings(module: str, resolution: float, threshold_a: float, threshold_b: float) -> tuple[int, float, float]:
    """The extension's ``bound_check_params``: a negative value takes the module's slider default."""
    spec = PREPROCESSORS[module]
    res = int(resolution) if resolution >= 0 or spec.resolution is None else spec.resolution
    a = threshold_a if threshold_a >= 0 or spec.threshold_a is None else spec.threshold_a
    b = threshold_b if threshold_b >= 0 or spec.threshold_b is None else spec.threshold_b
    return res, float(a), float(b)


def run(
    module: str,
    image: np.ndarray,
    resolution: float,
    threshold_a: float,
    threshold_b: float,
    seed: int = 0,
    annotator: Any = None,
) -> np.ndarray:
    """The detected map (uint8, H x W x 3) of ``module`` on an RGB image; ``seed`` seeds the random ones
    (shuffle), as the extension seeds numpy before preprocessing (:func:`gpu_runtime.controlnet.preprocessor_seed`);
    ``annotator``: the uploaded file of a module that needs weights."""
    import cv2

    image = _hwc3(np.ascontiguousarray(image, dtype=np.uint8))
    res, a, b = settings(module, resolution, threshold_a, threshold_b)
    if module == "none":
        return image
    if module == "invert":
        return 255 - image
    if module == "tile_resample":
        if a < 1.1:
            return image
        height, width = int(image.shape[0] / a), int(image.shape[1] / a)
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    padded, (height, width) = _resize_with_pad(image, res)
    if module == "shuffle":  # the padding is cut off before shuffling
        return content_shuffle(np.ascontiguousarray(padded[:height, :width]), np.random.RandomState(seed))
    if module in ANNOTATOR_FILES:
        from gpu_runtime import controlnet_annotators

        if annotator is None:
            raise ValueError(f"preprocessor {module} needs its annotator file {ANNOTATOR_FILES[module]}")
        result = np.ascontiguousarray(controlnet_annotators.run(module, padded, annotator)[:height, :width])
        return _hwc3(controlnet_annotators.scribble(result) if module == "scribble_hed" else result)
    if module == "canny":
        result = _hwc3(cv2.Canny(padded, int(a), int(b)))
    elif module == "threshold":
        result = np.zeros_like(padded, dtype=np.uint8)
        result[np.min(padded, axis=2) > a] = 255
    elif module == "blur_gaussian":
        return cv2.GaussianBlur(np.ascontiguousarray(padded[:height, :width]), (0, 0), a)
    elif module == "scribble_xdog":  # a difference of Gaussians, thresholded into strokes
        fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
        coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
        dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
        result = np.zeros_like(padded, dtype=np.uint8)
        result[2 * (255 - dog) > a] = 255
    elif module == "lineart_standard":  # darker-than-surroundings, normalised by the median line strength
        x = padded.astype(np.float32)
        intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
        strong = intensity[intensity > 8]
        intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
        result = _hwc3((intensity * 127).clip(0, 255).astype(np.uint8))
    else:
        raise ValueError(f"unknown preprocessor {module}")
    return np.ascontiguousarray(result[:height, :width])


def noise_disk(rng: np.random.RandomState, height: int, width: int, scale: int) -> np.ndarray:
    """Smooth noise in [0, 1] (H x W x 1): a coarse uniform grid, one cell per ``scale`` px plus a border,
    bicubically enlarged, cropped and min-max normalised (the extension's ``make_noise_disk``)."""
    import cv2

    coarse = rng.uniform(low=0, high=1, size=(height // scale + 2, width // scale + 2, 1))
    noise = cv2.resize(coarse, (width + 2 * scale, height + 2 * scale), interpolation=cv2.INTER_CUBIC)
    noise = noise[scale : scale + height, scale : scale + width]
    noise = noise - np.min(noise)
    return (noise / np.max(noise))[:, :, None]


def content_shuffle(image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """The extension's ``ContentShuffleDetector``: every pixel is taken from a random, smoothly varying place of
    the image (x noise drawn first, then y), so the map keeps the colours and textures but not the layout."""
    import cv2

    height, width = image.shape[:2]
    x = noise_disk(rng, height, width, SHUFFLE_NOISE_SCALE) * float(width - 1)
    y = noise_disk(rng, height, width, SHUFFLE_NOISE_SCALE) * float(height - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(image, flow, None, cv2.INTER_LINEAR)


def pixel_perfect_resolution(image_hw: tuple[int, int], target_hw: tuple[int, int], resize_mode: int) -> int:
    """The extension's ``pixel_perfect_resolution``: the short side at which the map lands 1:1 on the output
    (Resize and Fill fits the image inside, the other modes cover)."""
    (h0, w0), (h, w) = image_hw, target_hw
    k = min(h / h0, w / w0) if resize_mode == 2 else max(h / h0, w / w0)
    return int(np.round(k * min(h0, w0)))
