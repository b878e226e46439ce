"""kohya's sample images during training (``sample_every_n_epochs``/``_steps``, ``sample_at_first``,
``sample_prompts`` with its inline options, ``sample_sampler``) on the tiny model, on CPU: where and when they are
written, that they follow the prompt file, that they show the LoRA, and that they never change the training."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from gpu_runtime.trainer import TrainingError
from tests.gpu_runtime.test_trainer import config_with, root, run  # noqa: F401 (root is a fixture)

# 4 images x 2 repeats in one batch of 8: one optimizer step per epoch, two epochs
ONE_STEP_EPOCHS = {"train_batch_size": 8, "max_train_epochs": 2, "network_dropout": 0.25}
PROMPTS = (
    "a photo of a cat --w 64 --h 64 --d 42 --s 2 --l 5 --ss euler_a\n"
    "# a comment line\n"
    "\n"
    "a (dog:1.2) --n blurry --w 128 --h 64 --d 7 --s 2\n"
    "a photo of a cat --w 64 --h 64 --d 42 --s 2 --l 5 --ss k_euler_a\n"
)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def prompt_file(tmp_path: Path, text: str = PROMPTS, name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_epoch_samples_follow_the_prompt_file_show_the_lora_and_leave_training_bit_exact(root, tmp_path):  # noqa: F811
    prompts = prompt_file(tmp_path)
    config = config_with(
        tmp_path, **ONE_STEP_EPOCHS, sample_every_n_epochs=1, sample_at_first=True, sample_prompts=str(prompts)
    )
    result = run(root, tmp_path, config)
    folder = tmp_path / "out" / "sample"
    expected = [
        f"out_e{epoch:06d}_{index:02d}_{seed}.png" for epoch in (0, 1, 2) for index, seed in enumerate((42, 7, 42))
    ]
    assert [path.name for path in result.samples] == expected  # kohya's names without the timestamp
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    assert Image.open(folder / "out_e000001_00_42.png").size == (64, 64)
    assert Image.open(folder / "out_e000001_01_7.png").size == (128, 64)  # --w 128 --h 64
    for epoch in (0, 1, 2):  # the same prompt and seed (euler_a and its k_ alias) give the same image
        assert np.array_equal(
            pixels(folder / f"out_e{epoch:06d}_00_42.png"), pixels(folder / f"out_e{epoch:06d}_02_42.png")
        )
    # the LoRA is applied: after training the same prompt and seed give another image than at step 0
    assert not np.array_equal(pixels(folder / "out_e000000_00_42.png"), pixels(folder / "out_e000002_00_42.png"))
    assert not np.array_equal(pixels(folder / "out_e000001_00_42.png"), pixels(folder / "out_e000002_00_42.png"))

    # sampling never touches the training: without it (dropout draws from torch's RNG every step) the files are
    # bit-identical
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain = run(root, plain_dir, config_with(plain_dir, **ONE_STEP_EPOCHS))
    assert plain.samples == [] and not (plain_dir / "out" / "sample").exists()
    assert [p.name for p in plain.files] == [p.name for p in result.files]
    for sampled, unsampled in zip(result.files, plain.files, strict=True):
        a, b = load_file(str(sampled)), load_file(str(unsampled))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    # the seed makes the image: a second run writes the same pixels
    again_dir = tmp_path / "again"
    again_dir.mkdir()
    again = run(
        root, again_dir, config_with(again_dir, **ONE_STEP_EPOCHS, sample_at_first=True, sample_prompts=str(prompts))
    )
    assert [p.name for p in again.samples] == expected[:3]  # only sample_at_first: no epoch samples
    for path in again.samples:
        assert np.array_equal(pixels(path), pixels(folder / path.name))


def test_step_samples_from_a_toml_prompt_file(root, tmp_path):  # noqa: F811
    prompts = prompt_file(
        tmp_path,
        "[prompt]\nwidth = 64\nheight = 64\nsample_steps = 2\nscale = 4.0\n\n"
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 3\n\n'
        '[[prompt.subset]]\nprompt = "a cat"\nseed = 4\nsample_sampler = "dpmsolver++"\n',
        "prompts.toml",
    )
    config = config_with(
        tmp_path, **ONE_STEP_EPOCHS, sample_every_n_steps=1, sample_sampler="k_dpm_2", sample_prompts=str(prompts)
    )
    result = run(root, tmp_path, config)
    assert [p.name for p in result.samples] == [
        "out_000001_00_3.png",
        "out_000001_01_4.png",
        "out_000002_00_3.png",
        "out_000002_01_4.png",
    ]
    assert all(Image.open(p).size == (64, 64) for p in result.samples)
    assert not np.array_equal(pixels(result.samples[0]), pixels(result.samples[1]))  # another seed and sampler


def test_samplers_the_runtime_cannot_provide_are_refused_by_name(root, tmp_path):  # noqa: F811
    prompts = prompt_file(tmp_path)
    for name, message in (
        ("dpmsolver", "sample_sampler 'dpmsolver' is not supported"),
        ("UniPC", "sample_sampler 'UniPC' is not a kohya sampler"),
    ):
        with pytest.raises(TrainingError, match=message):
            run(
                root,
                tmp_path,
                config_with(
                    tmp_path,
                    **ONE_STEP_EPOCHS,
                    sample_every_n_epochs=1,
                    sample_sampler=name,
                    sample_prompts=str(prompts),
                ),
            )
    bad = prompt_file(tmp_path, "a cat --ss dpmsingle --s 2\n", "bad.txt")
    with pytest.raises(TrainingError, match="sample prompt 1: sampler 'dpmsingle' is not supported"):
        run(root, tmp_path, config_with(tmp_path, **ONE_STEP_EPOCHS, sample_every_n_epochs=1, sample_prompts=str(bad)))
    with pytest.raises(TrainingError, match="sample_every_n_steps needs sample_prompts"):
        run(root, tmp_path, config_with(tmp_path, **ONE_STEP_EPOCHS, sample_every_n_steps=2))
    with pytest.raises(TrainingError, match=r"sample_prompts file .* does not exist"):
        run(
            root, tmp_path, config_with(tmp_path, **ONE_STEP_EPOCHS, sample_at_first=True, sample_prompts="missing.txt")
        )
    assert list(tmp_path.glob("out/*")) == []  # every refusal comes before any training
