"""kohya's aspect-ratio buckets and image augmentations in the LoRA trainer: the bucket list and the placement of
images (values worked out by hand from sd-scripts' make_bucket_resolutions / select_bucket), batches drawn per
bucket, ss_bucket_info, and the effect of flip_aug, random_crop and color_aug on the pixels the VAE encodes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from gpu_runtime.trainer import TrainingConfig, TrainingError, load_dataset, train
from gpu_runtime.trainer.buckets import BucketSelector, bucket_resolutions, color_aug
from tests.gpu_runtime.test_trainer import config_with

# resolution 128, min 64, max 256, steps 64: the square 128x128, then widths 64..256 with the tallest height that
# keeps 128*128: 64 -> 256, 128 -> 128, 192 -> 64 (16384 // 192 = 85 -> 64), 256 -> 64, and their transposes
BUCKETS_128 = [(64, 192), (64, 256), (128, 128), (192, 64), (256, 64)]
BUCKET_OPTIONS = {"enable_bucket": True, "resolution": "128,128", "min_bucket_reso": 64, "max_bucket_reso": 256}
# (file, width, height) -> bucket; repeats 1 (folder 1_mixed)
IMAGES = {
    "a_square.png": (128, 128),  # in the list: no resize -> (128, 128)
    "b_big.png": (300, 300),  # ratio 1 -> (128, 128), shrunk with cv2 INTER_AREA
    "c_wide.png": (200, 64),  # ratio 3.125 -> (192, 64) (error 0.125 vs 0.875), scale 64/64: trimmed 4 px a side
    "d_wide.png": (200, 64),
    "e_wide.png": (200, 64),
    "f_tall.png": (64, 250),  # ratio 0.256 -> (64, 256), scale 256/250 -> 66x256 (LANCZOS, up), trimmed 1 px
}
# the three wide images alone, one batch of 3 in the 192x64 bucket: one cheap step per epoch
WIDE_IMAGES = ("c_wide.png", "d_wide.png", "e_wide.png")
WIDE = {**BUCKET_OPTIONS, "dataset": "wide", "train_batch_size": 3}
BUCKET_OF = {
    "a_square.png": (128, 128),
    "b_big.png": (128, 128),
    "c_wide.png": (192, 64),
    "d_wide.png": (192, 64),
    "e_wide.png": (192, 64),
    "f_tall.png": (64, 256),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny model, a mixed-aspect dataset (``1_mixed/``) of random pixels (so flips and crops show) and a work dir."""
    from gpu_runtime.tiny import write_tiny_model

    base = tmp_path_factory.mktemp("buckets")
    write_tiny_model(base / "tiny.safetensors", seed=0)
    folder = base / "mixed" / "1_mixed"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, (width, height) in IMAGES.items():
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a photo, {name[0]}\n")
    (base / "wide" / "1_wide").mkdir(parents=True)
    for name in WIDE_IMAGES:
        for path in (folder / name, (folder / name).with_suffix(".txt")):
            (base / "wide" / "1_wide" / path.name).write_bytes(path.read_bytes())
    narrow = base / "narrow" / "4_narrow"  # one 121x128 image, 4 repeats
    narrow.mkdir(parents=True)
    Image.fromarray(rng.randint(0, 255, (128, 121, 3), dtype=np.uint8)).save(narrow / "n.png")
    (base / "work").mkdir()
    return base


def source(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / "mixed" / "1_mixed" / name).convert("RGB"))


def expected_pixels(root: Path, name: str) -> np.ndarray:
    """The bucket-sized image kohya's trim_and_resize_if_required makes, spelt out per image (HWC uint8)."""
    image = source(root, name)
    if name == "a_square.png":
        return image
    if name == "b_big.png":
        return cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)
    if name == "f_tall.png":
        resized = np.asarray(Image.fromarray(image).resize((66, 256), Image.Resampling.LANCZOS))
        return resized[:, 1:65]
    return image[:, 4:196]


class Recorder:
    """What the VAE encodes (the pixels after crop/augmentation, -1..1) and the latents the UNet sees."""

    def __init__(self, monkeypatch):
        self.encoded: list[torch.Tensor] = []
        self.unet: list[tuple[int, ...]] = []
        encode, forward = AutoencoderKL.encode, UNet2DConditionModel.forward

        def recording_encode(vae, x, *args, **kwargs):
            self.encoded.append(x.detach().clone())
            return encode(vae, x, *args, **kwargs)

        def recording_forward(unet, sample, *args, **kwargs):
            self.unet.append(tuple(sample.shape))
            return forward(unet, sample, *args, **kwargs)

        monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
        monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)

    def images(self) -> list[torch.Tensor]:
        """Every encoded image as uint8 CHW (the loop feeds pixels / 127.5 - 1)."""
        return [((x + 1.0) * 127.5).round().to(torch.uint8) for batch in self.encoded for x in batch]


def find_window(array: np.ndarray, window: torch.Tensor) -> list[tuple[int, int]]:
    """Every (top, left) where ``window`` (CHW) is an uncropped, unresized cut of ``array`` (HWC)."""
    cut = window.permute(1, 2, 0).numpy()
    height, width = cut.shape[:2]
    tops, lefts = np.nonzero((array[: array.shape[0] - height + 1, : array.shape[1] - width + 1] == cut[0, 0]).all(-1))
    return [
        (t, x) for t, x in zip(tops, lefts, strict=True) if np.array_equal(array[t : t + height, x : x + width], cut)
    ]


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def run(root: Path, tmp_path: Path, name: str = "config.toml", dataset: str = "mixed", **overrides):
    config = config_with(tmp_path, name, **{"max_train_epochs": 1, "save_every_n_epochs": None, **overrides})
    return train(
        config,
        root / "tiny.safetensors",
        root / dataset,
        tmp_path / f"out-{name}",
        device="cpu",
        work_dir=root / "work",
    )


def lora(result) -> dict[str, torch.Tensor]:
    with safe_open(str(result.files[-1]), "pt") as handle:
        keys = sorted(handle.keys())
        return {key: handle.get_tensor(key) for key in keys}


def test_bucket_lists_and_placements_are_kohyas():
    # resolution 512, min 256, max 1024, steps 64 (kohya's defaults): 512^2 = 262144; for each width w the height
    # is min(1024, (262144 // w) // 64 * 64): 256 -> 1024, 320 -> 768, 384 -> 640, 448 -> 576, 512 -> 512,
    # 576 -> 448, 640 -> 384, 704 -> 320, 768 -> 320, 832..1024 -> 256; plus every transpose
    assert bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    assert bucket_resolutions((128, 128), 64, 256, 64) == BUCKETS_128

    up = BucketSelector((512, 512), 256, 1024, 64, no_upscale=False)
    # 1000x500 (ratio 2): nearest ratio 704/320 = 2.2 (640/384 = 1.67 is further); 2 < 2.2 so the width is matched
    placement = up.select(1000, 500)
    assert (placement.bucket, placement.resized) == ((704, 320), (704, 352))
    assert placement.ar_error == 704 / 320 - 2.0
    # 500x1000: 320/704 = 0.4545; 0.5 > 0.4545 so the height is matched: 704/1000 -> 352x704
    assert (up.select(500, 1000).bucket, up.select(500, 1000).resized) == ((320, 704), (352, 704))
    # 640x480 (1.333): 576/448 = 1.286; 1.333 > 1.286 so the height: 448/480 -> int(597.33 + 0.5) = 597
    assert (up.select(640, 480).bucket, up.select(640, 480).resized) == ((576, 448), (597, 448))
    assert (up.select(300, 300).bucket, up.select(300, 300).resized) == ((512, 512), (512, 512))  # upscaled
    assert up.select(320, 768).resized == (320, 768)  # a bucket's own size is kept

    no_up = BucketSelector((512, 512), 256, 1024, 64, no_upscale=True)
    # smaller than 512^2: own size, rounded down to 64 -> 256x192 (never upscaled)
    assert (no_up.select(300, 200).bucket, no_up.select(300, 200).resized) == ((256, 192), (300, 200))
    assert no_up.select(300, 200).ar_error == 256 / 192 - 1.5
    # 1200x600: sqrt(262144 * 2) = 724.08 x 362.04; width-rounded 704 x 320 (ratio 2.2) vs height-rounded
    # 640 x 320 (ratio 2.0): the height wins -> resized 640x320, bucket 640x320
    assert (no_up.select(1200, 600).bucket, no_up.select(1200, 600).resized) == ((640, 320), (640, 320))
    assert (no_up.select(1000, 1000).bucket, no_up.select(1000, 1000).resized) == ((512, 512), (512, 512))
    # min/max do not matter with bucket_no_upscale; a 100x2000 image is under the area: 64x1984
    assert BucketSelector((512, 512), 512, 512, 64, no_upscale=True).select(100, 2000).bucket == (64, 1984)


def test_load_dataset_puts_images_in_their_buckets_resized_and_cropped_as_kohya(root, tmp_path):
    config = TrainingConfig.from_dict({**BUCKET_OPTIONS, "caption_extension": ".txt"})
    images = load_dataset(root / "mixed", config)
    assert {image.path.name: image.bucket for image in images} == BUCKET_OF
    for image in images:
        width, height = image.bucket
        assert tuple(image.pixels.shape) == (3, height, width)
        assert torch.equal(image.pixels, chw(expected_pixels(root, image.path.name))), image.path.name
        assert image.original_size == IMAGES[image.path.name][::-1]
    by_name = {image.path.name: image for image in images}
    # kohya's get_crop_ltrb: 200x64 fitted in 192x64 is 192 x 61.44 -> top (64 - 61.44) // 2 = 1, left 0
    assert (by_name["c_wide.png"].crop_top_left, by_name["c_wide.png"].flipped_crop_top_left) == ((1, 0), (1, 0))
    assert by_name["f_tall.png"].crop_top_left == (3, 0)  # 64 x 250 in 64x256

    # a 121x128 image in the 128x128 bucket is fitted 121 wide: left (128 - 121) // 2 = 3, right 124, mirrored 4
    (image,) = load_dataset(root / "narrow", config)
    assert (image.bucket, image.crop_top_left, image.flipped_crop_top_left) == ((128, 128), (0, 3), (0, 4))

    no_upscale = TrainingConfig.from_dict({**BUCKET_OPTIONS, "bucket_no_upscale": True})
    assert "bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored" in "\n".join(no_upscale.warnings)
    sizes = {image.path.name: image.bucket for image in load_dataset(root / "mixed", no_upscale)}
    # under 128^2 = 16384 px: own size rounded down to 64; 300x300 shrinks to 128x128
    assert sizes == {**BUCKET_OF, "c_wide.png": (192, 64), "f_tall.png": (64, 192)}


def test_batches_never_mix_buckets_and_latents_have_the_buckets_shape(root, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    result = run(root, tmp_path, **BUCKET_OPTIONS, cache_latents=False)
    # batches of 2 per bucket: 128x128 (2 images) 1, 192x64 (3) 2, 64x256 (1) 1 -> 4 per epoch (not ceil(6/2) = 3)
    assert (result.steps, result.epochs) == (4, 1)
    latent_shapes = {(2, 4, 16, 16), (2, 4, 8, 24), (1, 4, 8, 24), (1, 4, 32, 8)}
    assert sorted(recorder.unet) == sorted(latent_shapes)
    assert [tuple(x.shape) for x in recorder.encoded] == [(s[0], 3, s[2] * 8, s[3] * 8) for s in recorder.unet]
    # every image once per epoch, as kohya made it (no flip, no crop drawn)
    seen = recorder.images()
    expected = [chw(expected_pixels(root, name)) for name in IMAGES]
    assert all(any(torch.equal(image, e) for e in expected) for image in seen) and len(seen) == 6

    with safe_open(str(result.files[-1]), "pt") as handle:
        meta = handle.metadata()
    info = json.loads(meta["ss_bucket_info"])
    assert info["buckets"] == {
        "0": {"resolution": [64, 256], "count": 1},
        "1": {"resolution": [128, 128], "count": 2},
        "2": {"resolution": [192, 64], "count": 3},
    }
    # |3 - 3.125| for the three wide images, |0.25 - 0.256| for the tall one, 0 for the squares; mean over 6
    assert info["mean_img_ar_error"] == pytest.approx((3 * 0.125 + (0.256 - 0.25)) / 6)
    assert (meta["ss_enable_bucket"], meta["ss_bucket_no_upscale"]) == ("True", "False")
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("64", "256")
    assert meta["ss_num_batches_per_epoch"] == "4" and meta["ss_resize_interpolation"] == "None"

    # cached latents train the same buckets
    recorder.unet.clear()
    cached = run(root, tmp_path, "cached.toml", **BUCKET_OPTIONS, cache_latents=True)
    assert sorted(recorder.unet) == sorted(latent_shapes) and cached.steps == 4


def test_without_buckets_the_options_change_nothing(root):
    config = TrainingConfig.from_dict({"resolution": 128, "min_bucket_reso": 64, "bucket_no_upscale": True})
    assert config.min_bucket_reso is None and not config.bucket_no_upscale
    assert "min_bucket_reso, bucket_no_upscale: no effect without enable_bucket" in "\n".join(config.warnings)
    images = load_dataset(root / "mixed", config)
    assert {image.bucket for image in images} == {(128, 128)}
    assert all(tuple(image.pixels.shape) == (3, 128, 128) for image in images)


def test_flip_aug_feeds_mirrored_pixels_and_changes_the_result(root, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    flipped = run(root, tmp_path, "flip.toml", **WIDE, cache_latents=False, flip_aug=True, max_train_epochs=2)
    seen = recorder.images()
    plain = [chw(source(root, name)[:, 4:196]) for name in WIDE_IMAGES]
    mirrored = [p.flip(-1) for p in plain]
    as_is = sum(any(torch.equal(image, p) for p in plain) for image in seen)
    flips = sum(any(torch.equal(image, m) for m in mirrored) for image in seen)
    assert as_is + flips == len(seen) == 6 and as_is and flips  # each sample one or the other, both happen

    unflipped = run(root, tmp_path, "plain.toml", **WIDE, cache_latents=False, max_train_epochs=2)
    assert any(not torch.equal(a, b) for a, b in zip(lora(flipped).values(), lora(unflipped).values(), strict=True))

    # with cache_latents kohya encodes both orientations up front (3 images x 2) and picks one per sample
    recorder.encoded.clear()
    cached = run(root, tmp_path, "cached.toml", **WIDE, cache_latents=True, flip_aug=True)
    encoded = recorder.images()
    assert len(encoded) == 6 and all(torch.equal(encoded[2 * i + 1], encoded[2 * i].flip(-1)) for i in range(3))
    assert safe_open(str(cached.files[-1]), "pt").metadata()["ss_flip_aug"] == "True"


def test_random_crop_cuts_other_windows_than_the_center(root, tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    result = run(root, tmp_path, **WIDE, cache_latents=False, random_crop=True, max_train_epochs=3)
    wide = [source(root, name) for name in WIDE_IMAGES]
    # a 192x64 window of the 200x64 image (no resize: the scale is 1), left in [0, 8]; the center crop is at 4
    offsets = [left for image in recorder.images() for array in wide for _, left in find_window(array, image)]
    assert len(offsets) == 9 and set(offsets) <= set(range(9)) and set(offsets) != {4}
    assert safe_open(str(result.files[-1]), "pt").metadata()["ss_random_crop"] == "True"

    # without buckets kohya does not resize: a random resolution-sized window of the image as it is
    recorder.encoded.clear()
    flat = {**WIDE, "enable_bucket": False, "resolution": "64,64"}
    run(root, tmp_path, "flat.toml", **flat, cache_latents=False, random_crop=True)
    windows = [where for image in recorder.images() for array in wide for where in find_window(array, image)]
    assert len(windows) == 3 and {left for _, left in windows} != {68}  # 64 of 200 wide, centered at 68
    with pytest.raises(TrainingError, match="random_crop without enable_bucket cuts images at their own size"):
        run(root, tmp_path, "small.toml", resolution="128,128", cache_latents=False, random_crop=True)


def test_color_aug_is_kohyas_hue_shift_or_gamma(root, tmp_path, monkeypatch):
    image = np.random.RandomState(1).randint(0, 255, (8, 8, 3), dtype=np.uint8)

    class Draws(random.Random):
        def __init__(self, *values: float):
            super().__init__(0)
            self.values = list(values)

        def random(self) -> float:
            return self.values.pop(0)

    assert np.array_equal(color_aug(image, Draws(0.34)), image)  # p = 0.33
    # hue: 0.9 > 0.5; uniform(-8, 8) = -8 + 16 * 0.25 = -4 -> +176 on OpenCV's 0-180 hue of the (BGR-read) array
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, 0] = (hsv[:, :, 0].astype(np.float64) + 176.0) % 180
    assert np.array_equal(color_aug(image, Draws(0.33, 0.9, 0.25)), cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR))
    # gamma: 0.2 <= 0.5; uniform(0.95, 1.05) at 1.0 = 1.05 applied to 0-255 values, clipped, truncated
    gamma = np.clip(image.astype(np.float64) ** 1.05, 0, 255).astype(np.uint8)
    assert np.array_equal(color_aug(image, Draws(0.1, 0.2, 1.0)), gamma)

    recorder = Recorder(monkeypatch)
    run(root, tmp_path, **WIDE, cache_latents=False, color_aug=True, max_train_epochs=3)
    plain = [chw(source(root, name)[:, 4:196]) for name in WIDE_IMAGES]
    unchanged = sum(any(torch.equal(image, p) for p in plain) for image in recorder.images())
    assert 0 < unchanged < 9  # about two thirds pass unchanged; the rest are shifted


def test_cache_latents_refuses_color_aug_and_random_crop_and_bad_bucket_options(root, tmp_path):
    for overrides, message in (
        ({"color_aug": True}, "cache_latents cannot be used with color_aug"),
        ({"random_crop": True, "cache_latents_to_disk": True}, "cache_latents cannot be used with random_crop"),
        ({**BUCKET_OPTIONS, "min_bucket_reso": 192}, "min_bucket_reso 192 must not be larger than the resolution"),
        ({**BUCKET_OPTIONS, "max_bucket_reso": 64}, "max_bucket_reso 64 must not be smaller than the resolution"),
        ({**BUCKET_OPTIONS, "resize_interpolation": "magic"}, "resize_interpolation must be one of"),
    ):
        with pytest.raises(TrainingError, match=message):
            TrainingConfig.from_dict({"cache_latents": True, **overrides})
    adjusted = TrainingConfig.from_dict({**BUCKET_OPTIONS, "min_bucket_reso": 100, "max_bucket_reso": 200})
    assert (adjusted.min_bucket_reso, adjusted.max_bucket_reso) == (64, 256)  # kohya: down / up to the steps
    assert any("min_bucket_reso 100 is lowered to 64" in w for w in adjusted.warnings)
    with pytest.raises(TrainingError, match="bucket_reso_steps is 32: it must be divisible by 64"):
        run(root, tmp_path, **BUCKET_OPTIONS, bucket_reso_steps=32)  # kohya's verify_bucket_reso_steps(64)


def test_sdxl_is_conditioned_on_the_bucket_and_the_mirrored_crop(root, tmp_path, monkeypatch):
    """kohya's SDXL time ids: original (h, w), crop top/left from get_crop_ltrb (of the mirror image when flipped),
    target = the bucket (h, w); bucket_reso_steps only has to divide by 32 for SDXL."""
    from gpu_runtime.tiny import write_tiny_sdxl_model

    model = write_tiny_sdxl_model(tmp_path / "xl.safetensors")
    recorder = Recorder(monkeypatch)
    time_ids: list[list[float]] = []
    forward = UNet2DConditionModel.forward

    def recording_forward(unet, sample, *args, **kwargs):
        time_ids.extend(kwargs["added_cond_kwargs"]["time_ids"].tolist())
        return forward(unet, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    overrides = {**BUCKET_OPTIONS, "bucket_reso_steps": 32, "flip_aug": True, "cache_latents": False}
    config = config_with(tmp_path, max_train_epochs=1, save_every_n_epochs=None, train_batch_size=1, **overrides)
    train(config, model, root / "narrow", tmp_path / "out", device="cpu", work_dir=root / "work")
    # 121x128 -> bucket 128x128 (resized 128x135, 3 rows trimmed top and bottom)
    plain = chw(
        np.asarray(Image.open(root / "narrow" / "4_narrow" / "n.png").resize((128, 135), Image.Resampling.LANCZOS))[
            3:131
        ]
    )
    pairs = list(zip(recorder.images(), time_ids, strict=True))
    assert len(pairs) == 4
    for pixels, ids in pairs:
        assert ids == (
            [128, 121, 0, 4, 128, 128] if torch.equal(pixels, plain.flip(-1)) else [128, 121, 0, 3, 128, 128]
        )
        assert torch.equal(pixels, plain) or torch.equal(pixels, plain.flip(-1))
    assert {ids[3] for _, ids in pairs} == {3, 4}  # both orientations were drawn
