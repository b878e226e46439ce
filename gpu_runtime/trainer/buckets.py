"""kohya's aspect-ratio buckets and image augmentations, so that an image lands in the bucket, at the size and crop,
that sd-scripts gives it, and a batch is drawn the way sd-scripts draws it.

Followed from sd-scripts: ``library/model_util.py`` ``make_bucket_resolutions``; ``library/train_util.py``
``BucketManager`` (``select_bucket``, ``round_to_steps``, ``get_crop_ltrb``), ``BaseDataset.make_buckets`` /
``shuffle_buckets``, ``trim_and_resize_if_required`` and ``AugHelper.color_aug``; ``library/utils.py``
``resize_image``. Images are numpy ``HWC`` uint8 arrays (RGB, as PIL reads them) here; the dataset turns them into
tensors.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Size = tuple[int, int]  # (width, height), kohya's order for resolutions and buckets

# kohya's --resize_interpolation choices (argparse), and the library each one runs on in resize_image.
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area")


def bucket_resolutions(max_reso: Size, min_size: int, max_size: int, steps: int) -> list[Size]:
    """kohya's predefined buckets (``make_bucket_resolutions``): the square of the resolution's area, then for every
    width from ``min_size`` to ``max_size`` in ``steps`` the tallest height (a multiple of ``steps``, at most
    ``max_size``) that keeps the area, with its transpose; sorted."""
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // steps) * steps
    resos = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, int((max_area // width) // steps) * steps)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
    return sorted(resos)


@dataclass(frozen=True)
class Placement:
    """Where ``select_bucket`` puts one image: its bucket, the size it is resized to before the crop, and the
    bucket's aspect-ratio error (bucket ratio minus image ratio) that kohya averages into ``mean_img_ar_error``."""

    bucket: Size
    resized: Size
    ar_error: float


class BucketSelector:
    """kohya's ``BucketManager.select_bucket``: with upscaling, the predefined bucket of the nearest aspect ratio
    (the image is scaled to cover it); with ``no_upscale``, a bucket of the image's own size (shrunk to the
    resolution's area when larger), rounded down to ``steps``."""

    def __init__(self, resolution: Size, min_size: int, max_size: int, steps: int, no_upscale: bool):
        self.max_area = resolution[0] * resolution[1]
        self.steps = steps
        self.no_upscale = no_upscale
        self.predefined = [] if no_upscale else bucket_resolutions(resolution, min_size, max_size, steps)
        self._predefined_set = set(self.predefined)

    def _round(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.steps

    def select(self, width: int, height: int) -> Placement:
        ratio = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                # the first bucket with the smallest |ratio error|, as numpy's argmin picks it
                errors = [abs(w / h - ratio) for w, h in self.predefined]
                reso = self.predefined[errors.index(min(errors))]
            # cover the bucket: match the side that the bucket is relatively shorter in
            scale = reso[1] / height if ratio > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                # shrink to the area, keeping the ratio; round the width or the height to steps, whichever errs less
                resized_width = math.sqrt(self.max_area * ratio)
                resized_height = self.max_area / resized_width
                width_rounded = self._round(resized_width)
                ratio_by_width = width_rounded / self._round(width_rounded / ratio)
                height_rounded = self._round(resized_height)
                ratio_by_height = self._round(height_rounded * ratio) / height_rounded
                if abs(ratio_by_width - ratio) < abs(ratio_by_height - ratio):
                    resized = (width_rounded, int(width_rounded / ratio + 0.5))
                else:
                    resized = (int(height_rounded * ratio + 0.5), height_rounded)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        return Placement(reso, resized, reso[0] / reso[1] - ratio)


def crop_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """kohya's ``get_crop_ltrb``: the left/top/right/bottom of the image fitted inside the bucket (Stability AI's
    SDXL crop conditioning as kohya computes it; the right edge gives the left edge of a flipped image)."""
    bucket_ratio = bucket[0] / bucket[1]
    image_ratio = image_size[0] / image_size[1]
    if bucket_ratio > image_ratio:
        width, height = bucket[1] * image_ratio, float(bucket[1])
    else:
        width, height = float(bucket[0]), bucket[0] / image_ratio
    left, top = (bucket[0] - width) // 2, (bucket[1] - height) // 2
    return left, top, left + width, top + height


def resize(image: Any, size: Size, interpolation: str | None = None) -> Any:
    """kohya's ``resize_image``: by default cv2's ``INTER_AREA`` when shrinking in both sides, PIL's ``LANCZOS``
    otherwise; a named ``interpolation`` runs where kohya runs it (lanczos on PIL, the others on cv2).

    The libraries are kohya's own (opencv is a runtime dependency), so the pixels are the ones kohya computes.
    kohya hands PIL a BGR->RGB converted copy and converts back; PIL filters each channel alone, so resizing the
    RGB array directly gives the same bytes."""
    height, width = image.shape[:2]
    if interpolation is None:
        interpolation = "area" if width >= size[0] and height >= size[1] else "lanczos"
    if interpolation == "lanczos":
        import numpy as np
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize(size, resample=Image.Resampling.LANCZOS))
    import cv2

    flags = {
        "nearest": cv2.INTER_NEAREST_EXACT,
        "bilinear": cv2.INTER_LINEAR,
        "linear": cv2.INTER_LINEAR,
        "bicubic": cv2.INTER_CUBIC,
        "cubic": cv2.INTER_CUBIC,
        "area": cv2.INTER_AREA,
    }
    return cv2.resize(image, size, interpolation=flags[interpolation])


def trim_offsets(image_size: Size, bucket: Size, rng: random.Random | None, height_first: bool = False) -> Size:
    """The (left, top) of the bucket-sized window cut from a larger image: centered, or with ``rng`` (kohya's
    ``random_crop``) uniform in ``[0, excess]``. kohya draws the width first in ``trim_and_resize_if_required``
    (buckets) and the height first in ``__getitem__`` (no buckets); a side without excess draws nothing."""
    offsets = [0, 0]
    for axis in (1, 0) if height_first else (0, 1):
        excess = image_size[axis] - bucket[axis]
        if excess > 0:
            offsets[axis] = rng.randint(0, excess) if rng is not None else excess // 2
    return offsets[0], offsets[1]


def color_aug(image: Any, rng: random.Random) -> Any:
    """kohya's ``AugHelper.color_aug``: with probability 0.33 either a hue shift of up to 8 (OpenCV's 0-180 hue
    scale) or a gamma in [0.95, 1.05] applied to the 0-255 values, each half the time.

    As in kohya, the RGB array goes through ``COLOR_BGR2HSV`` and back (the channel order only flips the direction
    of the shift), the shifted hue is truncated into uint8 and the gamma is computed in float64 and truncated."""
    import numpy as np

    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        import cv2

        hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
        shift = rng.uniform(-8, 8)
        if shift < 0:
            shift += 180
        hsv[:, :, 0] = (hsv[:, :, 0] + shift) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(image.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


class BucketBatches:
    """kohya's batching with buckets: each bucket holds its images (every repeat, in dataset order), is cut into
    ``batch_size`` slices (the last one may be short), and the list of (bucket, slice) is the epoch's batches.

    kohya reshuffles in place at every epoch with ``random.seed(seed + epoch)`` (the slice list first, then each
    bucket), starting with epoch 0 when the buckets are made, so epoch ``e`` sees the shuffles ``seed + 0 .. e``
    applied in turn; this class keeps that state. kohya's DataLoader permutes the batches once more with torch's
    global RNG; that second uniform permutation of an already uniformly shuffled list is not reproduced."""

    def __init__(self, placements: Sequence[tuple[Size, int]], batch_size: int, seed: int):
        self.resos = sorted({bucket for bucket, _ in placements})
        where = {reso: index for index, reso in enumerate(self.resos)}
        self.buckets: list[list[int]] = [[] for _ in self.resos]
        for image, (bucket, repeats) in enumerate(placements):
            self.buckets[where[bucket]].extend([image] * repeats)
        self.slices = [
            (index, number)
            for index, bucket in enumerate(self.buckets)
            for number in range(math.ceil(len(bucket) / batch_size))
        ]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._shuffle()

    def _shuffle(self) -> None:
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(self.slices)
        for bucket in self.buckets:
            rng.shuffle(bucket)

    def __len__(self) -> int:
        return len(self.slices)

    def batches(self, epoch: int) -> list[list[int]]:
        """The image indexes of every batch of ``epoch`` (1-based, increasing), in the order they are trained."""
        while self.epoch < epoch:
            self.epoch += 1
            self._shuffle()
        size = self.batch_size
        return [self.buckets[index][number * size : (number + 1) * size] for index, number in self.slices]
