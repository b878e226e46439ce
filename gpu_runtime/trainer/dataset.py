"""A kohya dataset folder: ``<repeats>_<name>/`` subfolders of images with captions beside them, loaded into memory
at the training resolution, and the captions' tag frequency (what one step sees is :mod:`.captions`)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainImage:
    """One training image, resized and center-cropped to the training resolution (uint8 CHW), with its caption."""

    path: Path
    folder: str
    repeats: int
    caption: str
    pixels: torch.Tensor
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL's size conditioning
    crop_top_left: tuple[int, int]


_FOLDER = re.compile(r"^(\d+)_(.+)$")


def _read_caption(path: Path, wildcard: bool = False) -> str | None:
    """The first non-empty line of the caption file; with ``enable_wildcard`` all non-empty lines (kohya picks one
    per step)."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"caption {path.name} could not be read: {exc}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if wildcard:
        return "\n".join(lines)
    return lines[0] if lines else ""


def _load_image(path: Path, width: int, height: int) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize so the image covers width x height, then center-crop (kohya's behaviour without buckets)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise TrainingError(f"image {path.parent.name}/{path.name} could not be read: {exc}") from exc
    w, h = image.size
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    return pixels, (h, w), (top, left)


def load_dataset(dataset_dir: Path, config: TrainingConfig, warnings: list[str] | None = None) -> list[TrainImage]:
    """Read a kohya dataset folder: ``<repeats>_<name>/`` subfolders of images with ``<stem><caption_extension>``
    captions. Images directly in ``dataset_dir`` or in folders without a repeats prefix count once (with a
    warning); an image without a caption file is captioned with its folder's name, as kohya does."""
    warnings = warnings if warnings is not None else []
    root = Path(dataset_dir)
    if not root.is_dir():
        raise TrainingError(f"the dataset folder {root} does not exist")
    width, height = config.resolution
    groups: list[tuple[Path, str, int]] = []
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        groups.append((root, root.name, 1))
        warnings.append(
            "images directly in the dataset folder are used with 1 repeat (kohya expects <repeats>_<name>/)"
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _FOLDER.match(folder.name)
        if match is None:
            warnings.append(f"folder {folder.name} has no <repeats>_ prefix: its images are used with 1 repeat")
            groups.append((folder, folder.name, 1))
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            warnings.append(f"folder {folder.name} has 0 repeats: its images are not used")
            continue
        groups.append((folder, match.group(2), repeats))
    images: list[TrainImage] = []
    uncaptioned: list[str] = []
    for folder, class_name, repeats in groups:
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        for path in files:
            caption = _read_caption(path.with_name(path.stem + config.caption_extension), config.enable_wildcard)
            if caption is None:
                uncaptioned.append(f"{folder.name}/{path.name}")
                caption = class_name
            pixels, original, crop = _load_image(path, width, height)
            images.append(TrainImage(path, folder.name, repeats, caption, pixels, original, crop))
    if not images:
        raise TrainingError(
            f"the dataset has no images ({', '.join(IMAGE_EXTENSIONS)}) in {root.name} or its <repeats>_<name> folders"
        )
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        warnings.append(
            f"{len(uncaptioned)} image(s) have no {config.caption_extension} caption and use their folder name: "
            + shown
        )
    return images


def _tag_frequency(images: list[TrainImage]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how many images carry each tag (split at commas whatever
    ``caption_separator`` says, lower-cased, as kohya's ``set_tag_frequency`` does)."""
    frequency: dict[str, Counter] = {}
    for image in images:
        counter = frequency.setdefault(image.folder, Counter())
        for tag in image.caption.split(","):
            if tag.strip():
                counter[tag.strip().lower()] += 1
    return {folder: dict(counter) for folder, counter in frequency.items()}
