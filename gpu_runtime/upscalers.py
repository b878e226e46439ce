"""Model upscalers: checkpoints of type ``ESRGAN`` (every super-resolution architecture spandrel detects from a
file's keys: ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, SPAN, ...), run as A1111 v1.8.0 runs them.

A1111 facts kept here (``modules/upscaler.py``, ``modules/upscaler_utils.py``, ``modules/images.py``):
- ``Upscaler.upscale`` targets ``int(w * scale) // 8 * 8``, runs the model up to three times until the image
  covers the target (a 4x model runs once for scale 2, twice for scale 8), then Lanczos-resizes to the target;
- the model sees BGR in [0, 1] and its output is clamped and truncated to uint8;
- images are cut into ``ESRGAN_tile`` (192) px tiles overlapping by ``ESRGAN_tile_overlap`` (8) px, with A1111's
  grid (tiles at the far edge are pulled inside the image, a smaller image is padded with black) and its linear
  blend across the overlaps, so a large image needs one tile's memory at a time.

A1111's built-in upscaler names ("R-ESRGAN 4x+", "SwinIR 4x", ...) name the files A1111 downloads for them
(``gpu_runtime.protocol.scripts.UPSCALER_FILES``), so a user who uploads that file gets the built-in name too;
nothing is ever downloaded here.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_runtime.errors import JobError

ESRGAN_TILE = 192
ESRGAN_TILE_OVERLAP = 8
MAX_TARGET_PIXELS = 64_000_000
# spandrel purposes a checkpoint of each type must have
PURPOSES = {"ESRGAN": ("SR", "Restoration"), "GFPGAN": ("FaceSR",), "Codeformer": ("FaceSR",)}


def load_descriptor(path: Path, model_type: str, device: str, dtype: Any) -> Any:
    """A spandrel model descriptor for an uploaded file, checked to be the kind its checkpoint type says."""
    try:
        import spandrel
        import spandrel_extra_arches

        spandrel_extra_arches.install(ignore_duplicates=True)
    except ImportError:  # pragma: no cover - the runtime extra installs both
        raise JobError("spandrel is not installed in this runtime") from None
    import torch

    loader = spandrel.ModelLoader(device=device)
    try:
        if path.suffix.lower() in (".pth", ".safetensors"):  # spandrel unpickles .pth with an allow-list
            descriptor = loader.load_from_file(str(path))
        else:  # never TorchScript (.pt) from an upload: tensors only
            state = torch.load(str(path), map_location=device, weights_only=True)
            descriptor = loader.load_from_state_dict(state.get("params_ema") or state.get("params") or state)
    except spandrel.UnsupportedModelError:
        raise JobError(f"{model_type} model {path.name}: spandrel does not recognise its architecture") from None
    except Exception as exc:  # a truncated or foreign file
        raise JobError(f"{model_type} model {path.name} could not be read: {str(exc)[:200]}") from None
    if descriptor.purpose not in PURPOSES[model_type]:
        raise JobError(
            f"{model_type} model {path.name} is a {descriptor.architecture.name} {descriptor.purpose} model, "
            f"not one of: {', '.join(PURPOSES[model_type])}"
        )
    use_half = dtype == torch.float16 and descriptor.supports_half
    descriptor.model.to(dtype=torch.float16 if use_half else torch.float32)
    descriptor.model.eval()
    return descriptor


class ModelCache:
    """The last few upscaler models, keyed by file: they are small next to a checkpoint,
    and an extras batch or a hires batch reuses one model for every image."""

    def __init__(self, device: str, dtype: Any, size: int = 3):
        self.device, self.dtype, self.size = device, dtype, size
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, model_type: str) -> Any:
        key = (str(path), model_type)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        descriptor = load_descriptor(path, model_type, self.device, self.dtype)
        with self._lock:
            self._models[key] = descriptor
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return descriptor


def upscale(image: Any, scale: float, do_upscale: Callable[[Any], Any]) -> Any:
    """A1111's ``Upscaler.upscale``: at most three model passes until the image covers ``scale`` times its size
    (floored to a multiple of 8), then a Lanczos resize to exactly that."""
    from PIL import Image

    dest_w, dest_h = int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8
    if dest_w < 8 or dest_h < 8 or dest_w * dest_h > MAX_TARGET_PIXELS:
        raise JobError(f"the upscaled image would be {dest_w}x{dest_h}, outside 8x8 .. 64 megapixels")
    for _ in range(3):
        size = image.size
        image = do_upscale(image)
        if image.size == size or (image.width >= dest_w and image.height >= dest_h):
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image


def model_pass(descriptor: Any, tile: int = ESRGAN_TILE, overlap: int = ESRGAN_TILE_OVERLAP) -> Callable[[Any], Any]:
    """One pass of a model over a PIL image, tile by tile (A1111's ``upscale_with_model``)."""

    def run(image: Any) -> Any:
        if tile <= 0:
            return _patch(descriptor, image)
        grid = split_grid(image.convert("RGB"), tile, overlap)
        rows, factor = [], 1
        for y, height, row in grid.rows:
            out_row = []
            for x, width, piece in row:
                result = _patch(descriptor, piece)
                factor = result.width // piece.width
                out_row.append((x * factor, width * factor, result))
            rows.append((y * factor, height * factor, out_row))
        return combine_grid(
            Grid(rows, grid.tile * factor, grid.width * factor, grid.height * factor, grid.overlap * factor)
        )

    return run


def _patch(descriptor: Any, image: Any) -> Any:
    """The model on one RGB image: BGR in [0, 1] in, clamped BGR out, truncated to uint8 (as A1111 does)."""
    import numpy as np
    import torch
    from PIL import Image

    param = next(descriptor.model.parameters())
    array = np.ascontiguousarray(np.transpose(np.array(image.convert("RGB"))[:, :, ::-1], (2, 0, 1))) / 255
    tensor = torch.from_numpy(array).float().unsqueeze(0).to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        output = descriptor(tensor).squeeze(0).float().cpu().clamp(0, 1).numpy()
    output = (255.0 * np.moveaxis(output, 0, 2)).astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(output), "RGB")


class Grid:
    """Tiles of an image: ``rows`` is ``[(y, height, [(x, width, tile image), ...]), ...]``."""

    def __init__(self, rows: list, tile: int, width: int, height: int, overlap: int):
        self.rows, self.tile, self.width, self.height, self.overlap = rows, tile, width, height, overlap


def split_grid(image: Any, tile: int, overlap: int) -> Grid:
    """A1111's ``split_grid``: evenly spaced tiles, the last ones pulled back inside the image (so an image
    smaller than a tile gives one tile padded with black on its top and left)."""
    width, height = image.size
    cols = max(1, math.ceil((width - overlap) / (tile - overlap)))
    rows = max(1, math.ceil((height - overlap) / (tile - overlap)))
    dx = (width - tile) / (cols - 1) if cols > 1 else 0
    dy = (height - tile) / (rows - 1) if rows > 1 else 0
    grid = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile >= height:
            y = height - tile
        tiles = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile >= width:
                x = width - tile
            tiles.append((x, tile, image.crop((x, y, x + tile, y + tile))))
        grid.append((y, tile, tiles))
    return Grid(grid, tile, width, height, overlap)


def combine_grid(grid: Grid) -> Any:
    """A1111's ``combine_grid``: each tile's first ``overlap`` columns (rows) fade in linearly over the previous."""
    import numpy as np
    from PIL import Image

    ramp = (np.arange(grid.overlap, dtype=np.float32) * 255 / max(grid.overlap, 1)).astype(np.uint8)
    mask_w = Image.fromarray(np.repeat(ramp.reshape(1, -1), grid.tile, axis=0), "L")
    mask_h = Image.fromarray(np.repeat(ramp.reshape(-1, 1), grid.width, axis=1), "L")
    combined = Image.new("RGB", (grid.width, grid.height))
    for y, height, tiles in grid.rows:
        row = Image.new("RGB", (grid.width, height))
        for x, width, piece in tiles:
            if x == 0:
                row.paste(piece, (0, 0))
                continue
            row.paste(piece.crop((0, 0, grid.overlap, height)), (x, 0), mask=mask_w)
            row.paste(piece.crop((grid.overlap, 0, width, height)), (x + grid.overlap, 0))
        if y == 0:
            combined.paste(row, (0, 0))
            continue
        combined.paste(row.crop((0, 0, row.width, grid.overlap)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, grid.overlap, row.width, height)), (0, y + grid.overlap))
    return combined
