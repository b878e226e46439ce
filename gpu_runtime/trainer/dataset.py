"""A kohya dataset folder: ``<repeats>_<name>/`` subfolders of images with captions beside them, loaded into memory
at the training resolution (with ``enable_bucket``, at kohya's bucket of each image), kohya's regularization images
(``reg_data_dir``, the same layout, repeated to match the training images), the pixels one step sees (kohya's
``flip_aug``, ``random_crop`` and ``color_aug``) and the captions' tag frequency (what one step reads of a caption
is :mod:`.captions`)."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.buckets import BucketSelector, color_aug, crop_ltrb, resize, trim_offsets
from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.errors import TrainingError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainImage:
    """One training image with its caption, resized and cropped as kohya does (uint8 CHW ``pixels``).

    ``bucket`` is the (width, height) the step trains at: the resolution, or with ``enable_bucket`` kohya's bucket.
    With ``random_crop`` the loop cuts the window each step, so ``pixels`` is the larger image it cuts from.
    ``crop_top_left`` / ``flipped_crop_top_left`` are the SDXL crop conditioning of the image as is and mirrored.
    ``is_reg`` marks a regularization image (its loss is weighted by ``prior_loss_weight``); its ``repeats`` are the
    ones kohya's filling gave it, not its folder's.
    """

    path: Path
    folder: str
    repeats: int
    caption: str
    pixels: torch.Tensor
    original_size: tuple[int, int]  # (height, width) before resizing: SDXL's size conditioning
    crop_top_left: tuple[int, int]
    bucket: tuple[int, int] = (0, 0)
    flipped_crop_top_left: tuple[int, int] = (0, 0)
    ar_error: float = 0.0  # kohya's aspect-ratio error of the bucket (buckets only)
    is_reg: bool = False


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


def _read_rgb(path: Path) -> Any:
    """The image as an RGB uint8 HWC array (kohya's ``load_image``)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return np.asarray(opened.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for broken files
        raise TrainingError(f"image {path.parent.name}/{path.name} could not be read: {exc}") from exc


def _chw(array: Any) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _load_image(path: Path, config: TrainingConfig) -> TrainImage:
    """Resize so the image covers the resolution, then center-crop (this trainer's behaviour without buckets;
    PIL's LANCZOS unless ``resize_interpolation`` names another filter). The crop conditioning is the window's
    top-left in the resized image (mirrored: measured from the right edge)."""
    width, height = config.resolution
    array = _read_rgb(path)
    h, w = array.shape[:2]
    scale = max(width / w, height / h)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) != (w, h):
        array = resize(array, (new_w, new_h), config.resize_interpolation or "lanczos")
    left, top = (new_w - width) // 2, (new_h - height) // 2
    pixels = _chw(array[top : top + height, left : left + width])
    return TrainImage(path, "", 0, "", pixels, (h, w), (top, left), (width, height), (top, new_w - left - width))


def _place(path: Path, selector: BucketSelector, config: TrainingConfig) -> TrainImage:
    """kohya's bucket path (``select_bucket`` then ``trim_and_resize_if_required``): resize to the placement's
    size, then center-crop to the bucket (with ``random_crop`` the loop crops each step); the SDXL crop
    conditioning is kohya's ``get_crop_ltrb``, whatever the crop."""
    array = _read_rgb(path)
    h, w = array.shape[:2]
    try:
        placement = selector.select(w, h)
    except ZeroDivisionError:
        placement = None
    if placement is None or 0 in placement.bucket:
        raise TrainingError(
            f"image {path.parent.name}/{path.name} ({w}x{h}) is too small or too narrow for a bucket of "
            f"bucket_reso_steps={config.bucket_reso_steps}"
        )
    if placement.resized != (w, h):
        array = resize(array, placement.resized, config.resize_interpolation)
    if not config.random_crop:
        left, top = trim_offsets(placement.resized, placement.bucket, None)
        array = array[top : top + placement.bucket[1], left : left + placement.bucket[0]]
    left, top, right, _ = crop_ltrb(placement.bucket, (w, h))
    return TrainImage(
        path=path,
        folder="",
        repeats=0,
        caption="",
        pixels=_chw(array),
        original_size=(h, w),
        crop_top_left=(int(top), int(left)),
        bucket=placement.bucket,
        flipped_crop_top_left=(int(top), int(placement.bucket[0] - right)),
        ar_error=placement.ar_error,
    )


def _load(path: Path, config: TrainingConfig, selector: BucketSelector | None) -> TrainImage:
    """One image as the loop needs it (with or without buckets, with or without ``random_crop``)."""
    width, height = config.resolution
    if selector is not None:
        return _place(path, selector, config)
    if config.random_crop:
        # kohya without buckets does not resize: it cuts a random resolution-sized window from the image as it
        # is, and then conditions SDXL on that window's size with a zero crop (mirrored: left = width)
        array = _read_rgb(path)
        h, w = array.shape[:2]
        if w < width or h < height:
            raise TrainingError(
                f"random_crop without enable_bucket cuts images at their own size, as kohya does: "
                f"{path.parent.name}/{path.name} is {w}x{h}, smaller than the resolution {width}x{height}"
            )
        return TrainImage(path, "", 0, "", _chw(array), (height, width), (0, 0), (width, height), (0, width))
    return _load_image(path, config)


def _selector(config: TrainingConfig) -> BucketSelector | None:
    """kohya's bucket manager of the dataset (one for the training and the regularization images alike)."""
    if not config.enable_bucket:
        return None
    return BucketSelector(
        config.resolution,
        config.min_bucket_reso or 0,
        config.max_bucket_reso or 0,
        config.bucket_reso_steps or 1,
        config.bucket_no_upscale,
    )


def _folders(root: Path, warnings: list[str], label: str) -> list[tuple[Path, str, int]]:
    """The ``(folder, class name, repeats)`` groups of a dataset folder: ``<repeats>_<name>/`` subfolders (sorted);
    images directly in ``root`` or in folders without a repeats prefix count once (with a warning); 0 repeats skips
    the folder. ``label`` prefixes the warnings (``reg_data_dir: `` for the regularization folder)."""
    groups: list[tuple[Path, str, int]] = []
    if any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir()):
        groups.append((root, root.name, 1))
        what = "regularization" if label else "dataset"
        warnings.append(
            f"{label}images directly in the {what} folder are used with 1 repeat (kohya expects <repeats>_<name>/)"
        )
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _FOLDER.match(folder.name)
        if match is None:
            warnings.append(f"{label}folder {folder.name} has no <repeats>_ prefix: its images are used with 1 repeat")
            groups.append((folder, folder.name, 1))
            continue
        repeats = int(match.group(1))
        if repeats == 0:
            warnings.append(f"{label}folder {folder.name} has 0 repeats: its images are not used")
            continue
        groups.append((folder, match.group(2), repeats))
    return groups


@dataclass
class _Entry:
    """One image file of a dataset before it is loaded: where it is, its folder, repeats and caption."""

    path: Path
    folder: str
    repeats: int
    caption: str


def _entries(
    groups: list[tuple[Path, str, int]], config: TrainingConfig, warnings: list[str], label: str
) -> list[_Entry]:
    """Every image of the groups (sorted per folder) with its ``<stem><caption_extension>`` caption; an image
    without a caption file is captioned with its folder's class name, as kohya does (reported once)."""
    entries: list[_Entry] = []
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
            entries.append(_Entry(path, folder.name, repeats, caption))
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        warnings.append(
            f"{label}{len(uncaptioned)} image(s) have no {config.caption_extension} caption and use their folder "
            "name: " + shown
        )
    return entries


def load_dataset(dataset_dir: Path, config: TrainingConfig, warnings: list[str] | None = None) -> list[TrainImage]:
    """Read a kohya dataset folder: ``<repeats>_<name>/`` subfolders of images with ``<stem><caption_extension>``
    captions. Images directly in ``dataset_dir`` or in folders without a repeats prefix count once (with a
    warning); an image without a caption file is captioned with its folder's name, as kohya does."""
    warnings = warnings if warnings is not None else []
    root = Path(dataset_dir)
    if not root.is_dir():
        raise TrainingError(f"the dataset folder {root} does not exist")
    selector = _selector(config)
    entries = _entries(_folders(root, warnings, ""), config, warnings, "")
    if not entries:
        raise TrainingError(
            f"the dataset has no images ({', '.join(IMAGE_EXTENSIONS)}) in {root.name} or its <repeats>_<name> folders"
        )
    images: list[TrainImage] = []
    for entry in entries:
        image = _load(entry.path, config, selector)
        image.folder, image.repeats, image.caption = entry.folder, entry.repeats, entry.caption
        images.append(image)
    return images


def reg_repeats(folder_repeats: list[int], num_train_images: int) -> list[int]:
    """kohya's repeats of the regularization images (``DreamBoothDataset.__init__``): in order, each image joins
    with its folder's repeats until the count reaches ``num_train_images`` (the training images with repeats);
    the images after that are not used (0). When all of them together fall short, one more repeat is added to each
    in turn until the count is reached. So the regularization samples are exactly ``num_train_images`` when they
    are fewer, and the first images' whole repeats (at least ``num_train_images``) when they are more."""
    repeats = [0] * len(folder_repeats)
    count = 0
    for index, folder in enumerate(folder_repeats):
        if count >= num_train_images:
            return repeats
        repeats[index] = folder
        count += folder
    while repeats and count < num_train_images:
        for index in range(len(repeats)):
            repeats[index] += 1
            count += 1
            if count >= num_train_images:
                break
    return repeats


@dataclass
class RegImages:
    """The regularization images of a run: ``images`` are those kohya registers, with the repeats its filling gave
    them (:func:`reg_repeats`); ``num_reg_images`` is kohya's count with the folders' repeats, before the filling;
    ``dirs`` (``ss_reg_dataset_dirs``) and ``tag_frequency`` cover every image of the folder, used or not, as
    kohya records them."""

    images: list[TrainImage]
    num_reg_images: int
    dirs: dict[str, dict[str, int]]
    tag_frequency: dict[str, dict[str, int]]


def load_reg_images(
    reg_dir: Path, config: TrainingConfig, num_train_images: int, warnings: list[str] | None = None
) -> RegImages:
    """Read kohya's ``reg_data_dir`` (the same ``<repeats>_<name>/`` layout and caption rules as the dataset) and
    load the images kohya uses, through the same buckets, resize and crop as the training images. A missing folder
    or one without images is an error naming it (kohya only warns, and trains without them)."""
    warnings = warnings if warnings is not None else []
    root = Path(reg_dir)
    if not root.is_dir():
        raise TrainingError(f"reg_data_dir: the regularization folder {root} does not exist")
    label = "reg_data_dir: "
    entries = _entries(_folders(root, warnings, label), config, warnings, label)
    if not entries:
        raise TrainingError(
            f"reg_data_dir: the regularization folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) in it or "
            "its <repeats>_<name> folders"
        )
    num_reg_images = sum(entry.repeats for entry in entries)
    if num_train_images < num_reg_images:
        warnings.append(
            f"reg_data_dir: {num_reg_images} regularization images with repeats are more than the {num_train_images} "
            "training images: some are not used (as in kohya)"
        )
    elif num_reg_images < num_train_images:
        warnings.append(
            f"reg_data_dir: {num_reg_images} regularization images with repeats are fewer than the {num_train_images} "
            "training images: they are repeated to match (as in kohya)"
        )
    selector = _selector(config)
    images: list[TrainImage] = []
    for entry, repeats in zip(entries, reg_repeats([e.repeats for e in entries], num_train_images), strict=True):
        if repeats:
            image = _load(entry.path, config, selector)
            image.folder, image.repeats, image.caption, image.is_reg = entry.folder, repeats, entry.caption, True
            images.append(image)
    dirs: dict[str, dict[str, int]] = {}
    for entry in entries:
        dirs.setdefault(entry.folder, {"n_repeats": entry.repeats, "img_count": 0})["img_count"] += 1
    return RegImages(images, num_reg_images, dirs, _tag_frequency(entries))


def _tag_frequency(images: list[TrainImage] | list[_Entry]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how many images carry each tag (split at commas whatever
    ``caption_separator`` says, lower-cased, as kohya's ``set_tag_frequency`` does)."""
    frequency: dict[str, Counter] = {}
    for image in images:
        counter = frequency.setdefault(image.folder, Counter())
        for tag in image.caption.split(","):
            if tag.strip():
                counter[tag.strip().lower()] += 1
    return {folder: dict(counter) for folder, counter in frequency.items()}


def _pixels(image: TrainImage, config: TrainingConfig, rng: random.Random, flipped: bool) -> torch.Tensor:
    """The pixels one step sees, made as kohya's ``__getitem__`` makes them: the ``random_crop`` window, then
    ``color_aug``, then the flip (drawn by the caller, before these, as kohya draws it)."""
    pixels = image.pixels
    if config.random_crop:
        width, height = image.bucket
        left, top = trim_offsets(
            (pixels.shape[2], pixels.shape[1]), image.bucket, rng, height_first=not config.enable_bucket
        )
        pixels = pixels[:, top : top + height, left : left + width]
    if config.color_aug:
        pixels = _chw(color_aug(pixels.permute(1, 2, 0).contiguous().numpy(), rng))
    return pixels.flip(-1) if flipped else pixels
