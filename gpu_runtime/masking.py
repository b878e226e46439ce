"""Inpainting masks the way A1111 v1.8.0 prepares them (``processing.StableDiffusionProcessingImg2Img.init``,
``modules/masking.py``): binarised, inverted, blurred, cropped around the masked area for "inpaint at full
resolution", the masked area pre-filled, and the original composited back outside the mask at the end.

Pure Pillow/numpy so the rules can be checked without a model. White in the mask means "repaint".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_runtime.errors import JobError
from gpu_runtime.images import decode_image, flatten, resize_image


def binary_mask(image: Any, round_alpha: bool = True) -> Any:
    """A1111's ``create_binary_mask``: an RGBA mask with real transparency uses its alpha (thresholded at 128
    when ``mask_round``), anything else its luminance."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda x: 255 if x > 128 else 0) if round_alpha else alpha
    return image.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    size = 2 * int(2.5 * sigma + 0.5) + 1  # A1111's kernel size for cv2.GaussianBlur
    x = np.arange(size) - size // 2
    kernel = np.exp(-(x**2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _blur_axis(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    kernel = _gaussian_kernel(sigma)
    pad = len(kernel) // 2
    widths = [(0, 0), (0, 0)]
    widths[axis] = (pad, pad)
    padded = np.pad(values, widths, mode="reflect")  # OpenCV's default border, BORDER_REFLECT_101
    out = np.zeros_like(values)
    for i, weight in enumerate(kernel):
        index = [slice(None), slice(None)]
        index[axis] = slice(i, i + values.shape[axis])
        out += weight * padded[tuple(index)]
    return out


def blur(mask: Any, sigma_x: float, sigma_y: float) -> Any:
    """``mask_blur_x`` then ``mask_blur_y``: separable Gaussian passes (a sigma of 0 skips its pass)."""
    from PIL import Image

    values = np.asarray(mask, dtype=np.float64)
    if sigma_x > 0:
        values = _blur_axis(values, sigma_x, axis=1)
    if sigma_y > 0:
        values = _blur_axis(values, sigma_y, axis=0)
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def crop_region(mask: Any, padding: int) -> tuple[int, int, int, int] | None:
    """The bounding box of the non-zero mask plus ``padding``, clamped to the image (None: nothing masked)."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int, image_w: int, image_h: int) -> tuple:
    """Widen (or heighten) the crop box to the generation's aspect ratio, staying inside the image."""
    x1, y1, x2, y2 = box
    ratio_crop, ratio_gen = (x2 - x1) / (y2 - y1), width / height
    if ratio_crop > ratio_gen:
        desired = (x2 - x1) / ratio_gen
        diff = int(desired - (y2 - y1))
        y1, y2 = y1 - diff // 2, y2 + diff - diff // 2
        if y2 >= image_h:
            y1, y2 = y1 - (y2 - image_h), image_h
        if y1 < 0:
            y2, y1 = min(y2 - y1, image_h), 0
    else:
        desired = (y2 - y1) * ratio_gen
        diff = int(desired - (x2 - x1))
        x1, x2 = x1 - diff // 2, x2 + diff - diff // 2
        if x2 >= image_w:
            x1, x2 = x1 - (x2 - image_w), image_w
        if x1 < 0:
            x2, x1 = min(x2 - x1, image_w), 0
    return x1, y1, x2, y2


def fill(image: Any, mask: Any) -> Any:
    """``inpainting_fill`` 0: the masked area painted with blurs of the unmasked colours at falling radii."""
    from PIL import Image, ImageFilter

    base = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    from PIL import ImageOps

    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    kept = kept.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            base.alpha_composite(blurred)
    return base.convert("RGB")


@dataclass
class Inpaint:
    """One img2img job's mask, prepared: what the pipeline gets, the latent mask, and how to paste back."""

    images: list[Any]  # the init images as the pipeline sees them (cropped, resized, pre-filled)
    latent_mask: np.ndarray  # [h/8, w/8] of 0/1: 1 = repaint
    model_mask: Any  # the blurred mask at the generation size (an inpainting model's conditioning rounds it)
    overlays: list[Any]  # RGBA originals with the repainted area transparent
    paste_to: tuple[int, int, int, int] | None  # (x, y, w, h) in the original for full-resolution inpainting
    fill: int


def prepare(params: dict, init_images: list[Any], width: int, height: int, resize_mode: int) -> Inpaint:
    """A1111's img2img init for a mask: returns the images to denoise and what the result is composited with."""
    from PIL import Image, ImageOps

    mask = binary_mask(decode_image(params["mask"]), params.get("mask_round", True) is not False)
    if int(params.get("inpainting_mask_invert") or 0):
        mask = ImageOps.invert(mask)
    blur_x, blur_y = params.get("mask_blur_x", 4), params.get("mask_blur_y", 4)
    if isinstance(params.get("mask_blur"), int | float) and not isinstance(params.get("mask_blur"), bool):
        blur_x = blur_y = params["mask_blur"]
    for value in (blur_x, blur_y):
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 64:
            raise JobError("mask_blur, mask_blur_x and mask_blur_y must be numbers between 0 and 64")
    if blur_x or blur_y:
        mask = blur(mask, float(blur_x), float(blur_y))
    fill_mode = int(params.get("inpainting_fill") or 0)
    if fill_mode not in (0, 1, 2, 3):
        raise JobError("inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
    originals = [flatten(image) for image in init_images]
    paste_to = None
    full_res = params.get("inpaint_full_res", True) is not False
    if full_res:
        padding = int(params.get("inpaint_full_res_padding") or 0)
        box = crop_region(mask, padding)
        if box is None:
            raise JobError("the mask is empty: nothing to inpaint")
        box = expand_to_ratio(box, width, height, mask.width, mask.height)
        x1, y1, x2, y2 = box
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        overlay_mask = mask
        model_mask = resize_image(2, mask.crop(box).convert("RGB"), width, height).convert("L")
    else:
        model_mask = resize_image(resize_mode, mask.convert("RGB"), width, height).convert("L")
        doubled = np.clip(np.asarray(model_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled, mode="L")
    images, overlays = [], []
    for original in originals:
        image = original if full_res else resize_image(resize_mode, original, width, height)
        overlay = Image.new("RGBa", image.size)
        overlay.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
        overlays.append(overlay.convert("RGBA"))
        if full_res:
            image = resize_image(2, image.crop(box), width, height)
        if fill_mode == 0:
            image = fill(image, model_mask)
        images.append(image)
    small = model_mask.resize((width // 8, height // 8))
    latent_mask = np.around(np.asarray(small, dtype=np.float32) / 255)
    return Inpaint(images, latent_mask, model_mask, overlays, paste_to, fill_mode)


def composite(result: Any, overlay: Any, paste_to: tuple[int, int, int, int] | None) -> Any:
    """A1111's ``apply_overlay``: the result pasted back into the original's frame (full resolution), then the
    original composited over it outside the mask."""
    from PIL import Image

    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, result, w, h), (x, y))
        result = base
    image = result.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")
