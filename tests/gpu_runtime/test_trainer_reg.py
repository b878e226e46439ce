"""kohya's regularization images (``reg_data_dir``, ``prior_loss_weight``) in the LoRA trainer, on the tiny model on
CPU: kohya's repeat filling (worked out by hand from ``DreamBoothDataset.__init__``), reg images in the same batches,
buckets and epoch length as the training images, ``prior_loss_weight`` as the reg samples' loss weight, kohya's
``ss_*`` values, the resume digest and the errors of a missing or empty folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from gpu_runtime.trainer import TrainingConfig, TrainingError, train
from gpu_runtime.trainer import loop as trainer_loop
from gpu_runtime.trainer.dataset import load_reg_images, reg_repeats
from tests.gpu_runtime.test_trainer import PROMPT, config_with, root  # noqa: F401  (root is a fixture)

# the training dataset of test_trainer: 4 images x 2 repeats (2_tiny) = 8 training images with repeats
NUM_TRAIN = 8
TRAIN_CAPTIONS = {f"{PROMPT}, red, number {i}" for i in range(4)}
# one epoch, saved once, full-precision files so that equal LoRAs are equal bit for bit
ONE_EPOCH = {"max_train_epochs": 1, "save_every_n_epochs": None, "save_precision": "float"}


@pytest.fixture(scope="module")
def regs(tmp_path_factory) -> Path:
    """Regularization folders: ``few/1_person`` (3 images, 2 captioned, one captioned by its class "person"),
    ``many/2_dog`` (2) + ``many/3_person`` (3), ``wide/1_wide`` (one 200x64 image), ``empty/1_none`` (no image)."""
    base = tmp_path_factory.mktemp("reg")
    rng = np.random.RandomState(7)

    def image(path: Path, width: int = 64, height: int = 64, caption: str | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n")

    image(base / "few" / "1_person" / "a.png", caption="a person, reg a")
    image(base / "few" / "1_person" / "b.png", caption="a person, reg b")
    image(base / "few" / "1_person" / "c.png")  # no caption: the class name, "person"
    for name in ("a", "b"):
        image(base / "many" / "2_dog" / f"{name}.png", caption=f"a dog, dog {name}")
    for name in ("a", "b", "c"):
        image(base / "many" / "3_person" / f"{name}.png", caption=f"a person, person {name}")
    image(base / "wide" / "1_wide" / "w.png", width=200, height=64, caption="a wide reg")
    (base / "empty" / "1_none").mkdir(parents=True)
    (base / "empty" / "1_none" / "notes.txt").write_text("no images here")
    return base


def run(root: Path, config: Path, out: Path, **kwargs):  # noqa: F811
    return train(
        config, root / "tiny.safetensors", root / "dataset", out, device="cpu", work_dir=root / "work", **kwargs
    )


def metadata(result) -> dict[str, str]:
    with safe_open(str(result.files[-1]), "pt") as handle:
        return handle.metadata()


class Spy:
    """Every processed caption (in the loop's per-sample order) and every step's ``loss_weights``, recorded from
    the real functions the loop calls."""

    def __init__(self, monkeypatch):
        self.captions: list[str] = []
        self.weights: list[list[float] | None] = []
        caption, loss = trainer_loop.process_caption, trainer_loop.step_loss

        def recording_caption(*args, **kwargs):
            self.captions.append(caption(*args, **kwargs))
            return self.captions[-1]

        def recording_loss(*args, **kwargs):
            weights = args[8] if len(args) > 8 else kwargs.get("sample_weights")
            self.weights.append(None if weights is None else weights.tolist())
            return loss(*args, **kwargs)

        monkeypatch.setattr(trainer_loop, "process_caption", recording_caption)
        monkeypatch.setattr(trainer_loop, "step_loss", recording_loss)

    def batches(self) -> list[list[str]]:
        """The captions of each step's batch (the weights list gives each batch's size)."""
        out, at = [], 0
        for weights in self.weights:
            out.append(self.captions[at : at + len(weights)])
            at += len(weights)
        assert at == len(self.captions)
        return out


def test_reg_repeats_are_kohyas_filling():
    # fewer: 3 images of 1 repeat for 8 training images: all join (3), then +1 each in turn: 4, 5, 6, 7, 8
    assert reg_repeats([1, 1, 1], 8) == [3, 3, 2]
    assert reg_repeats([2, 1], 7) == [4, 3]  # 3, then +1 +1 (5), +1 +1 (7)
    # as many: each image keeps its folder's repeats
    assert reg_repeats([2, 2], 4) == [2, 2]
    # more: images join with their whole repeats until the count reaches 8 (2, 4, 7, 10); the rest are not used
    assert reg_repeats([2, 2, 3, 3, 3], 8) == [2, 2, 3, 3, 0]
    assert reg_repeats([5], 3) == [5]  # the first image's whole repeats, even past the training images
    assert reg_repeats([1] * 6, 4) == [1, 1, 1, 1, 0, 0]


def test_reg_images_fill_the_epoch_share_the_batches_and_are_weighted(root, regs, tmp_path, monkeypatch):  # noqa: F811
    shutil.copytree(regs / "few", tmp_path / "reg")  # reg_data_dir relative to the config file's folder
    spy = Spy(monkeypatch)
    options = {**ONE_EPOCH, "reg_data_dir": "reg", "prior_loss_weight": 0.5, "caption_prefix": "sks"}
    result = run(root, config_with(tmp_path, **options), tmp_path / "out")
    # 8 training + 8 reg samples (3 reg images filled to 3 + 3 + 2) in batches of 2: 8 steps, not 4
    assert (result.steps, result.epochs) == (8, 1)
    captions = [c.removeprefix("sks ") for c in spy.captions]
    assert all(c.startswith("sks ") for c in spy.captions)  # the same caption processing as the training images
    counts = {c: captions.count(c) for c in set(captions)}
    assert counts == {
        **{c: 2 for c in TRAIN_CAPTIONS},
        "a person, reg a": 3,
        "a person, reg b": 3,
        "person": 2,
    }
    # kohya's loss_weights: prior_loss_weight for each reg sample, 1 for each training sample, batch by batch
    batches = spy.batches()
    for batch, weights in zip(batches, spy.weights, strict=True):
        assert weights == [1.0 if c.removeprefix("sks ") in TRAIN_CAPTIONS else 0.5 for c in batch]
    # the reg images are shuffled in with the training images: some batches hold both
    assert any(len(set(weights)) == 2 for weights in spy.weights)
    assert any("they are repeated to match (as in kohya)" in w for w in result.warnings)

    meta = metadata(result)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("8", "3", "0.5")
    assert (meta["ss_num_batches_per_epoch"], meta["ss_max_train_steps"]) == ("8", "8")
    assert json.loads(meta["ss_dataset_dirs"]) == {"2_tiny": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 3}}
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["1_person"] == {"a person": 2, "reg a": 1, "reg b": 1, "person": 1}
    assert set(tags) == {"2_tiny", "1_person"}


def test_more_reg_images_than_training_images_leave_the_last_ones_out(root, regs, tmp_path, monkeypatch):  # noqa: F811
    warnings: list[str] = []
    config = TrainingConfig.from_dict({"resolution": 64, "caption_extension": ".txt"})
    reg = load_reg_images(regs / "many", config, NUM_TRAIN, warnings)
    # 2_dog a, b (2 each), 3_person a, b (3 each): 10 >= 8, so 3_person/c is not used
    assert [(i.folder, i.path.name, i.repeats, i.is_reg) for i in reg.images] == [
        ("2_dog", "a.png", 2, True),
        ("2_dog", "b.png", 2, True),
        ("3_person", "a.png", 3, True),
        ("3_person", "b.png", 3, True),
    ]
    assert reg.num_reg_images == 13 and all(tuple(i.pixels.shape) == (3, 64, 64) for i in reg.images)
    assert reg.dirs == {"2_dog": {"n_repeats": 2, "img_count": 2}, "3_person": {"n_repeats": 3, "img_count": 3}}
    assert reg.tag_frequency["3_person"]["person c"] == 1  # kohya counts every caption of the folder
    assert any("13 regularization images with repeats are more than the 8" in w for w in warnings)

    # trained from an absolute reg_data_dir: 8 + 10 samples in batches of 2 = 9 steps; 3_person/c never seen
    spy = Spy(monkeypatch)
    result = run(root, config_with(tmp_path, **ONE_EPOCH, reg_data_dir=str(regs / "many")), tmp_path / "out")
    assert result.steps == 9
    assert sorted(c for c in spy.captions if c not in TRAIN_CAPTIONS) == sorted(
        ["a dog, dog a"] * 2 + ["a dog, dog b"] * 2 + ["a person, person a"] * 3 + ["a person, person b"] * 3
    )
    meta = metadata(result)
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_num_batches_per_epoch"]) == (
        "8",
        "13",
        "9",
    )
    assert json.loads(meta["ss_reg_dataset_dirs"]) == reg.dirs
    assert json.loads(meta["ss_tag_frequency"])["3_person"] == {
        "a person": 3,
        "person a": 1,
        "person b": 1,
        "person c": 1,
    }


def test_prior_loss_weight_scales_the_reg_samples_loss_and_needs_reg_images(root, regs, tmp_path):  # noqa: F811
    shutil.copytree(regs / "few", tmp_path / "reg")
    # one batch of all 16 samples: one step, whose inputs (noise, timesteps, captions) do not depend on the weight
    one_step = {**ONE_EPOCH, "train_batch_size": 16, "reg_data_dir": "reg"}
    results = {}
    for weight in (0.0, 1.0, 3.0):
        out = tmp_path / f"out-{weight}"
        results[weight] = run(root, config_with(tmp_path, f"w{weight}.toml", **one_step, prior_loss_weight=weight), out)
    loss = {weight: result.loss for weight, result in results.items()}
    assert all(result.steps == 1 for result in results.values())
    # the step's loss is (sum of the training samples' losses + w x sum of the reg samples' losses) / 16: linear
    # in w, with a reg part (loss(1) - loss(0)) that is there
    reg_part = loss[1.0] - loss[0.0]
    assert abs(reg_part) > 1e-4
    assert loss[3.0] == pytest.approx(loss[0.0] + 3 * reg_part, rel=1e-5)
    loras = {weight: load_file(result.files[-1]) for weight, result in results.items()}
    assert any(not torch.equal(loras[0.0][k], loras[1.0][k]) for k in loras[1.0])
    assert metadata(results[3.0])["ss_prior_loss_weight"] == "3.0"

    # without reg images the weight weighs nothing: the same LoRA bit for bit, and the run says so
    plain = {**ONE_EPOCH, "train_batch_size": 8}
    one = run(root, config_with(tmp_path, "p1.toml", **plain), tmp_path / "p1")
    three = run(root, config_with(tmp_path, "p3.toml", **plain, prior_loss_weight=3.0), tmp_path / "p3")
    first, second = load_file(one.files[-1]), load_file(three.files[-1])
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert "prior_loss_weight has no effect without reg_data_dir (as in kohya)" in three.warnings
    assert metadata(one)["ss_reg_dataset_dirs"] == "{}" and metadata(one)["ss_num_reg_images"] == "0"


def test_reg_images_go_to_their_own_buckets(root, regs, tmp_path, monkeypatch):  # noqa: F811
    buckets = {"enable_bucket": True, "resolution": "128,128", "min_bucket_reso": 64, "max_bucket_reso": 256}
    config = TrainingConfig.from_dict({**buckets, "caption_extension": ".txt"})
    (wide,) = load_reg_images(regs / "wide", config, NUM_TRAIN).images
    # 200x64 (ratio 3.125) -> the 192x64 bucket at scale 1, center-cut 4 px a side, as kohya's trim does
    source = np.asarray(Image.open(regs / "wide" / "1_wide" / "w.png").convert("RGB"))
    assert wide.bucket == (192, 64) and wide.repeats == NUM_TRAIN
    assert torch.equal(wide.pixels, torch.from_numpy(source[:, 4:196].copy()).permute(2, 0, 1))

    shapes: list[tuple[int, ...]] = []
    forward = UNet2DConditionModel.forward

    def recording_forward(unet, sample, *args, **kwargs):
        shapes.append(tuple(sample.shape))
        return forward(unet, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    result = run(root, config_with(tmp_path, **ONE_EPOCH, **buckets, reg_data_dir=str(regs / "wide")), tmp_path / "out")
    # 8 training samples in 128x128 (4 batches of 2), the reg image's 8 in 192x64 (4 batches): 8 steps
    assert result.steps == 8
    assert sorted(shapes) == sorted([(2, 4, 16, 16)] * 4 + [(2, 4, 8, 24)] * 4)
    info = json.loads(metadata(result)["ss_bucket_info"])
    assert info["buckets"] == {
        "0": {"resolution": [128, 128], "count": 8},
        "1": {"resolution": [192, 64], "count": 8},
    }
    assert info["mean_img_ar_error"] == pytest.approx(0.125 / 5)  # over the 5 images, reg included


def test_resume_needs_the_same_reg_images(root, regs, tmp_path):  # noqa: F811
    options = {**ONE_EPOCH, "max_train_epochs": 2, "train_batch_size": 16}
    full_dir, first_dir = tmp_path / "full", tmp_path / "first"
    for folder in (full_dir, first_dir):
        shutil.copytree(regs / "few", folder / "reg")
    full = run(root, config_with(full_dir, **options, reg_data_dir="reg"), full_dir / "out")
    saved = {**options, "reg_data_dir": "reg", "save_state": True, "save_every_n_epochs": 1}
    run(root, config_with(first_dir, **saved), first_dir / "out")
    state = first_dir / "out" / "out-000001-state.pt"

    # the same reg images in another folder: resumed bit-exactly (where the folder lies is no training option)
    again_dir = tmp_path / "again"
    shutil.copytree(regs / "few", again_dir / "elsewhere")
    again = run(
        root,
        config_with(again_dir, **options, reg_data_dir="elsewhere", resume=str(state), output_name="again"),
        again_dir / "out",
    )
    final, resumed = load_file(full.files[-1]), load_file(again.files[-1])
    assert again.steps == full.steps == 2 and all(torch.equal(final[k], resumed[k]) for k in final)

    # another caption, or no reg images at all: not the saved training
    changed_dir = tmp_path / "changed"
    shutil.copytree(regs / "few", changed_dir / "reg")
    (changed_dir / "reg" / "1_person" / "a.txt").write_text("a person, another caption\n")
    digest = r"the dataset \(files, repeats, captions or buckets; the regularization images included\) differs"
    with pytest.raises(TrainingError, match=digest):
        run(root, config_with(changed_dir, **options, reg_data_dir="reg", resume=str(state)), changed_dir / "out")
    with pytest.raises(TrainingError, match=digest):
        run(root, config_with(changed_dir, "none.toml", **options, resume=str(state)), changed_dir / "out")


def test_reg_data_dir_paths_and_missing_or_empty_folders(root, regs, tmp_path):  # noqa: F811
    assert TrainingConfig.from_dict({}).reg_data_dir is None
    assert TrainingConfig.from_dict({"reg_data_dir": ""}).reg_data_dir is None  # a GUI's empty string: unset
    relative = TrainingConfig.from_toml(config_with(tmp_path, "rel.toml", reg_data_dir="reg"))
    assert relative.reg_data_dir == tmp_path / "reg"
    absolute = TrainingConfig.from_toml(config_with(tmp_path, "abs.toml", reg_data_dir=str(regs / "few")))
    assert absolute.reg_data_dir == regs / "few"

    missing = re.escape(f"reg_data_dir: the regularization folder {tmp_path / 'missing'} does not exist")
    with pytest.raises(TrainingError, match=missing):
        run(root, config_with(tmp_path, "missing.toml", reg_data_dir="missing"), tmp_path / "out")
    with pytest.raises(TrainingError, match=r"reg_data_dir: the regularization folder .*empty has no images"):
        run(root, config_with(tmp_path, "empty.toml", reg_data_dir=str(regs / "empty")), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
