"""Images in and out of the runtime: base64 decoding as A1111's API does it, PNG encoding, and A1111's resize modes.

Kept apart from the engine because extras, img2img and (later) ControlNet all need the same rules.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from gpu_runtime.errors import JobError


def decode_image(data: Any) -> Any:
    """A base64 (or data URL) image, fully read; a clear ``JobError`` for anything else."""
    from PIL import Image

    if not isinstance(data, str) or not data:
        raise JobError("images must be base64 strings")
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
        image.load()
    except Exception as exc:
        raise JobError(f"an input image could not be decoded: {exc}") from None
    return image


def encode_image(image: Any, infotext: str | None = None) -> str:
    """PNG as base64; ``infotext`` goes into the ``parameters`` text chunk, where A1111's "PNG info" reads it."""
    from PIL.PngImagePlugin import PngInfo

    buffer = io.BytesIO()
    info = None
    if infotext:
        info = PngInfo()
        info.add_text("parameters", infotext)
    image.save(buffer, format="PNG", compress_level=1, pnginfo=info)  # fast: on every job's critical path
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def flatten(image: Any, background: str = "#ffffff") -> Any:
    """RGB, with transparency composited onto ``background`` (A1111's ``images.flatten`` for init images)."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background)
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


def resize_image(mode: int, image: Any, width: int, height: int) -> Any:
    """A1111's ``images.resize_image`` with the Lanczos upscaler: 0 stretch, 1 cover and centre-crop, 2 fit and
    fill the bands by stretching the edge rows/columns."""
    from PIL import Image

    lanczos = Image.Resampling.LANCZOS
    if mode == 0:
        return image.resize((width, height), lanczos)
    ratio, source = width / height, image.width / image.height
    if mode == 1:
        scale_w = width if ratio > source else image.width * height // image.height
        scale_h = height if ratio <= source else image.height * width // image.width
        resized = image.resize((scale_w, scale_h), lanczos)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(resized, box=(width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        return canvas
    if mode == 2:
        scale_w = width if ratio < source else image.width * height // image.height
        scale_h = height if ratio >= source else image.height * width // image.width
        resized = image.resize((scale_w, scale_h), lanczos)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(resized, box=(width // 2 - scale_w // 2, height // 2 - scale_h // 2))
        if ratio < source:
            fill = height // 2 - scale_h // 2
            if fill > 0:
                canvas.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                bottom = resized.resize((width, fill), box=(0, resized.height, width, resized.height))
                canvas.paste(bottom, box=(0, fill + scale_h))
        elif ratio > source:
            fill = width // 2 - scale_w // 2
            if fill > 0:
                canvas.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                right = resized.resize((fill, height), box=(resized.width, 0, resized.width, height))
                canvas.paste(right, box=(fill + scale_w, 0))
        return canvas
    raise JobError(f"resize_mode={mode} is not supported by this runtime")
