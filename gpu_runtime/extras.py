"""A1111's "extras" tasks without model weights: resizing with PIL upscalers, and rembg when its model is present.

Upscalers that need network weights (ESRGAN, SwinIR, LDSR, ...) are refused with a clear error rather than
silently replaced by a plain resize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_runtime.engine import decode_image, encode_image
from gpu_runtime.errors import JobError

PIL_UPSCALERS = {"None": None, "Lanczos": "LANCZOS", "Nearest": "NEAREST"}


def run_extras(task: str, params: dict, root: Path) -> dict:
    if task == "rembg":
        return {"image": _rembg(params, root), "html_info": ""}
    if task == "extra-single-image":
        image, info = _upscale(decode_image(params.get("image", "")), params)
        return {"image": encode_image(image), "html_info": info}
    items = params.get("imageList") or []
    if not isinstance(items, list) or not items:
        raise JobError("extra-batch-images needs imageList")
    results, info = [], ""
    for item in items:
        data = item.get("data") if isinstance(item, dict) else item
        image, info = _upscale(decode_image(data), params)
        results.append(encode_image(image))
    return {"images": results, "html_info": info}


def _upscale(image: Any, params: dict) -> tuple[Any, str]:
    from PIL import Image

    names = [params.get("upscaler_1", "None") or "None", params.get("upscaler_2", "None") or "None"]
    for name in names:
        if name not in PIL_UPSCALERS:
            raise JobError(
                f"upscaler {name} needs model weights this runtime does not have; use Lanczos, Nearest or None"
            )
    method = next((PIL_UPSCALERS[n] for n in names if PIL_UPSCALERS[n]), "LANCZOS")
    if int(params.get("resize_mode", 0) or 0) == 1:
        width, height = int(params.get("upscaling_resize_w", 0) or 0), int(params.get("upscaling_resize_h", 0) or 0)
        if width < 1 or height < 1:
            raise JobError("upscaling_resize_w and upscaling_resize_h must be positive")
    else:
        scale = float(params.get("upscaling_resize", 2) or 2)
        if not 0 < scale <= 8:
            raise JobError("upscaling_resize must be between 0 and 8")
        width, height = round(image.width * scale), round(image.height * scale)
    if width * height > 64_000_000:
        raise JobError("the resized image would be too large")
    resized = image.resize((width, height), getattr(Image.Resampling, method))
    return resized, f"Postprocess upscale to: {width}x{height}, Postprocess upscaler: {names[0]}"


def _rembg(params: dict, root: Path) -> str:
    model = str(params.get("model") or "u2net")
    if "/" in model or "\\" in model or model.startswith("."):
        raise JobError(f"rembg model {model} is not allowed")
    model_file = root / "rembg" / f"{model}.onnx"
    if not model_file.exists():
        raise JobError(f"rembg model {model} is not available on this runtime (expected {model_file.name})")
    try:
        import os

        os.environ.setdefault("U2NET_HOME", str(model_file.parent))
        from rembg import new_session, remove
    except ImportError:
        raise JobError("rembg is not installed in this runtime") from None
    image = decode_image(params.get("input_image", ""))
    return encode_image(remove(image, session=new_session(model)))
