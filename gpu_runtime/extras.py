"""A1111's "extras" tasks: upscaling with PIL's or uploaded model upscalers (``gpu_runtime.upscalers``), then face
restoration (GFPGAN, then CodeFormer: A1111's postprocessing order 1000, 2000, 3000), and the rembg extension's
background removal with an uploaded rembg model.

An upscaler name that is neither PIL's nor a model sent with the job is refused with a clear error rather than
silently replaced by a plain resize. Sizes follow A1111 v1.8.0 (``Upscaler.upscale``, ``postprocessing_upscale``):
the target is floored to a multiple of 8, ``resize_mode`` 1 scales to cover the box and crops it (``upscaling_crop``),
upscaler 1 "None" leaves the image as it is, and upscaler 2 is blended in by ``extras_upscaler_2_visibility``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpu_runtime.errors import JobError
from gpu_runtime.images import decode_image, encode_image
from gpu_runtime.protocol.policy import PIL_UPSCALERS
from gpu_runtime.protocol.scripts import REMBG_SESSIONS, rembg_model

PIL_FILTERS = {"Lanczos": "LANCZOS", "Nearest": "NEAREST"}
ModelPass = Callable[[Any], Any]  # one pass of an upscaler over a PIL image


def run_extras(
    task: str,
    params: dict,
    models: Mapping[str, ModelPass] | None = None,
    faces: Mapping[str, Callable[..., Any]] | None = None,
    rembg_file: Path | None = None,
) -> dict:
    """One extras request (the policy has already refused what this cannot do); ``models`` holds one pass of
    each model upscaler sent with the job, by the name the request uses, ``faces`` each face restorer it runs,
    ``rembg_file`` the rembg model's uploaded file."""
    if task == "rembg":
        if rembg_file is None:
            raise JobError(f"rembg model {rembg_model(params)} was not sent with the job")
        return {
            "image": encode_image(remove_background(decode_image(params.get("input_image", "")), params, rembg_file)),
            "html_info": "",
        }
    if task == "extra-single-image":
        image, info = postprocess(decode_image(params.get("image", "")), params, models, faces)
        return {"image": encode_image(image), "html_info": info}
    items = params.get("imageList") or []
    if not isinstance(items, list) or not items:
        raise JobError("extra-batch-images needs imageList")
    results, info = [], ""
    for item in items:
        data = item.get("data") if isinstance(item, dict) else item
        image, info = postprocess(decode_image(data), params, models, faces)
        results.append(encode_image(image))
    return {"images": results, "html_info": info}


def _number(params: dict, name: str, default: float, low: float, high: float) -> float:
    value = params.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise JobError(f"{name} must be a number between {low:g} and {high:g}")
    return float(value)


def postprocess(
    image: Any,
    params: dict,
    models: Mapping[str, ModelPass] | None = None,
    faces: Mapping[str, Callable[..., Any]] | None = None,
) -> tuple[Any, str]:
    """A1111's postprocessing scripts in their order: upscale, GFPGAN, CodeFormer; each restorer's result is
    blended over its input by its visibility (``Image.blend``), and the infotext lists what ran."""
    import numpy as np
    from PIL import Image

    image, info = upscale(image, params, models)
    parts = [info] if info else []
    faces = faces or {}
    for name, field in (("GFPGAN", "gfpgan_visibility"), ("CodeFormer", "codeformer_visibility")):
        visibility = _number(params, field, 0, 0, 1)
        if visibility == 0:
            continue
        if name not in faces:  # the engine sends every restorer the visibilities ask for
            raise JobError(f"face restorer {name} is not available")
        source = image.convert("RGB")
        weight = _number(params, "codeformer_weight", 0, 0, 1) if name == "CodeFormer" else None
        restored = Image.fromarray(faces[name](np.array(source, dtype=np.uint8), weight))
        image = Image.blend(source, restored, visibility) if visibility < 1 else restored
        parts.append(f"{name} visibility: {round(visibility, 3):g}")
        if name == "CodeFormer":
            parts.append(f"CodeFormer weight: {round(weight or 0, 3):g}")
    return image, ", ".join(parts)


def upscale(image: Any, params: dict, models: Mapping[str, ModelPass] | None = None) -> tuple[Any, str]:
    """A1111's postprocessing upscale step: ``upscaler_1`` (PIL's or a model's, ``models`` holding one pass of
    each model upscaler the job was sent), blended with ``upscaler_2`` run on the original image."""
    from PIL import Image

    from gpu_runtime.upscalers import upscale as upscale_by

    models = models or {}
    names = [str(params.get(f) or "None").split(" [")[0] for f in ("upscaler_1", "upscaler_2")]
    unknown = [name for name in names if name not in PIL_UPSCALERS and name not in models]
    if unknown:  # the engine refuses them before any work, with the reason; a direct caller gets the name
        raise JobError(f"upscaler {unknown[0]} is not available")
    image = image.convert("RGB")
    if names[0] == "None":
        return image, ""
    mode = int(_number(params, "resize_mode", 0, 0, 1))
    crop = params.get("upscaling_crop", True) is not False
    if mode == 1:
        box_w = int(_number(params, "upscaling_resize_w", 512, 1, 16384))
        box_h = int(_number(params, "upscaling_resize_h", 512, 1, 16384))
        scale = max(box_w / image.width, box_h / image.height)
    else:
        scale = _number(params, "upscaling_resize", 2, 1, 8)

    def pil_pass(name: str) -> ModelPass:
        method = getattr(Image.Resampling, PIL_FILTERS[name])
        return lambda picture: picture.resize((int(picture.width * scale), int(picture.height * scale)), method)

    def upscaled(name: str) -> Any:
        result = upscale_by(image, scale, models[name] if name in models else pil_pass(name))
        if mode == 1 and crop:  # A1111 centres on a black canvas of the box
            canvas = Image.new("RGB", (box_w, box_h))
            canvas.paste(result, box=(box_w // 2 - result.width // 2, box_h // 2 - result.height // 2))
            result = canvas
        return result

    result = upscaled(names[0])
    visibility = _number(params, "extras_upscaler_2_visibility", 0, 0, 1)
    if names[1] != "None" and visibility > 0:
        result = Image.blend(result, upscaled(names[1]), visibility)
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {names[0]}"
    if names[1] != "None" and visibility > 0:
        info += f", Postprocess upscaler 2: {names[1]}"
    return result, info


def remove_background(image: Any, params: dict, model_file: Path) -> Any:
    """The rembg extension's API call, ``rembg.remove`` with its options, on the uploaded model file (read by the
    rembg session of that network, so nothing is downloaded)."""
    try:
        from rembg import new_session, remove
    except ImportError:  # pragma: no cover - the runtime extra installs it
        raise JobError("rembg is not installed in this runtime") from None
    name = rembg_model(params)
    # rembg reads custom models only from its home (U2NET_HOME): the job's file is its own home (jobs run one at a
    # time under the engine's lock, and nothing else in the runtime reads that variable)
    os.environ["U2NET_HOME"] = str(model_file.parent)
    try:
        session = new_session(REMBG_SESSIONS[name], model_path=str(model_file))
    except Exception as exc:  # not an ONNX file, or another network's
        raise JobError(f"rembg model {model_file.name} could not be loaded: {str(exc)[:200]}") from None
    options = {
        "only_mask": _flag(params, "return_mask"),
        "alpha_matting": _flag(params, "alpha_matting"),
        "alpha_matting_foreground_threshold": int(_number(params, "alpha_matting_foreground_threshold", 240, 0, 255)),
        "alpha_matting_background_threshold": int(_number(params, "alpha_matting_background_threshold", 10, 0, 255)),
        "alpha_matting_erode_size": int(_number(params, "alpha_matting_erode_size", 10, 0, 255)),
    }
    try:
        return remove(image, session=session, **options)
    except Exception as exc:  # onnxruntime's errors: a model whose inputs or outputs are not rembg's
        raise JobError(f"rembg model {model_file.name} failed on the image: {str(exc)[:200]}") from None


def _flag(params: dict, name: str) -> bool:
    value = params.get(name, False)
    if value not in (None, True, False):
        raise JobError(f"{name} must be true or false")
    return bool(value)
