"""kohya's step-based saves on the tiny model, on CPU: ``save_every_n_steps`` files (and with ``save_state`` step
states) at kohya's steps under kohya's names, ``save_last_n_steps`` / ``save_last_n_steps_state`` rotation by
kohya's step arithmetic, ``save_n_epoch_ratio``, the exact resume from a state saved in the middle of an epoch and
``train(uploadable=...)``'s check before the first step.

The expected files are worked out by hand from sd-scripts (train_network.py, train_util.get_remove_step_no and
save_and_remove_state_stepwise): after step s, the save s - n - 1 steps back, rounded down to a multiple of
save_every_n_steps, is removed (n counts steps, not files)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from safetensors import safe_open
from safetensors.torch import load_file

from gpu_runtime.trainer import TrainingCancelled, TrainingConfig, TrainingError, output_file_names
from gpu_runtime.trainer.config import _UNSUPPORTED
from tests.gpu_runtime.test_trainer import config_with, root, run  # noqa: F401  (root is a fixture)

# 4 images x 2 repeats / batch 2 = 4 batches, 4 steps an epoch (BASE_CONFIG); a constant learning rate so that a
# shorter run takes the same steps as the start of a longer one
STEPS = {"lr_scheduler": "constant", "save_every_n_epochs": None}
# every RNG the loop draws from in use: caption shuffles, flips and crops (no latent cache), LoRA dropout
RANDOM = {"cache_latents": False, "flip_aug": True, "shuffle_caption": True, "network_dropout": 0.1}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def recorder() -> tuple[list[tuple[str, str, int, bool]], object]:
    seen: list[tuple[str, str, int, bool]] = []
    return seen, lambda info: seen.append((info["kind"], info["path"].name, info["step"], info["removed"]))


def same_tensors(a: Path, b: Path) -> bool:
    first, second = load_file(a), load_file(b)
    return first.keys() == second.keys() and all(first[k].allclose(second[k], rtol=0, atol=1e-6) for k in first)


# --- the options ------------------------------------------------------------------------------------------------


def test_step_options_are_parsed_checked_and_name_kohyas_files():
    for key in ("save_every_n_steps", "save_last_n_steps", "save_last_n_steps_state", "save_n_epoch_ratio"):
        assert key not in _UNSUPPORTED
        for bad in (0, -2, 1.5, "often", True):
            with pytest.raises(TrainingError, match=rf"^{key} must be "):
                TrainingConfig.from_dict({key: bad})
    config = TrainingConfig.from_dict(
        {"output_name": "my_lora", "save_every_n_steps": "5", "save_last_n_steps": 12, "save_state": True}
    )
    assert (config.save_every_n_steps, config.save_last_n_steps, config.save_last_n_steps_state) == (5, 12, None)
    assert config.step_file(105) == "my_lora-step00000105.safetensors"
    assert config.step_state_file(105) == "my_lora-step00000105-state.pt"
    unnamed = TrainingConfig.from_dict({"save_every_n_steps": 2})
    assert unnamed.step_file(4) == "at-step00000004.safetensors"  # kohya's DEFAULT_STEP_NAME
    # every multiple up to the last step, the last step included; the states after the files
    assert output_file_names(config, 3, 15) == [
        *(f"my_lora-step{s:08d}.safetensors" for s in (5, 10, 15)),
        *(f"my_lora-step{s:08d}-state.pt" for s in (5, 10, 15)),
        "my_lora.safetensors",
        "my_lora-state.pt",
    ]
    assert output_file_names(config, 3) == ["my_lora.safetensors", "my_lora-state.pt"]  # steps unknown: none

    warned = TrainingConfig.from_dict({"save_last_n_steps": 3, "save_every_n_epochs": 2, "save_n_epoch_ratio": 3})
    assert "save_last_n_steps has no effect without save_every_n_steps" in warned.warnings
    assert "save_every_n_epochs is replaced by what save_n_epoch_ratio gives (as in kohya)" in warned.warnings
    no_state = TrainingConfig.from_dict({"save_every_n_steps": 2, "save_last_n_steps_state": 3})
    assert "save_last_n_steps_state has no effect without save_state" in no_state.warnings


def test_save_last_n_steps_counts_steps_back_as_kohya():
    config = TrainingConfig.from_dict({"save_every_n_steps": 10, "save_last_n_steps": 30})
    # kohya's own example: at step 50 the saves of 30 steps back are kept and step 10 is removed
    assert [config.removed_step(s, 30) for s in (10, 20, 30, 40, 50, 60)] == [None, None, None, None, 10, 20]
    # fewer steps than one save interval: only the newest save stays
    assert [config.removed_step(s, 5) for s in (10, 20, 30)] == [None, 10, 20]
    # not a multiple: rounded down to one (save at 21 - 4 - 1 = 16 -> 14 with saves every 7)
    sevens = TrainingConfig.from_dict({"save_every_n_steps": 7})
    assert [sevens.removed_step(s, 4) for s in (7, 14, 21)] == [None, 7, 14]
    assert config.removed_step(50, None) is None


def test_save_n_epoch_ratio_sets_kohyas_save_every_n_epochs():
    ratio = TrainingConfig.from_dict({"save_n_epoch_ratio": 3, "save_every_n_epochs": 1, "output_name": "r"})
    # kohya: floor(epochs / ratio) or 1
    assert [ratio.epoch_interval(e) for e in (1, 2, 3, 7, 9, 10)] == [1, 1, 1, 2, 3, 3]
    assert output_file_names(ratio, 10) == [*(f"r-{e:06d}.safetensors" for e in (3, 6, 9)), "r.safetensors"]
    assert TrainingConfig.from_dict({"save_every_n_epochs": 4}).epoch_interval(10) == 4


def test_save_n_epoch_ratio_in_a_run_follows_the_epochs_of_max_train_steps(root, tmp_path):  # noqa: F811
    # batch 8: one step an epoch; 5 steps = 5 epochs, ratio 2 -> every floor(5 / 2) = 2 epochs: 2 and 4
    config = config_with(
        tmp_path, train_batch_size=8, max_train_epochs=None, max_train_steps=5, save_n_epoch_ratio=2, **STEPS
    )
    result = run(root, tmp_path, config)
    assert names(tmp_path / "out") == ["out-000002.safetensors", "out-000004.safetensors", "out.safetensors"]
    assert result.epochs == 5


# --- step saves in a run ----------------------------------------------------------------------------------------


def test_step_files_and_states_at_kohyas_steps_with_its_rotation(root, tmp_path):  # noqa: F811
    """8 steps, a save every 2: files and states after steps 2, 4, 6, 8 (the last step too). save_last_n_steps = 5
    removes step 2 at step 8 (8 - 5 - 1 = 2); save_last_n_steps_state = 3 removes step 2 at 6 and 4 at 8."""
    options = {**STEPS, "save_every_n_steps": 2, "save_last_n_steps": 5, "save_state": True}
    config = config_with(tmp_path, **options, save_last_n_steps_state=3)
    parsed = TrainingConfig.from_toml(config)
    expected_names = output_file_names(parsed, 2, 8)
    assert expected_names == [
        *(f"out-step{s:08d}.safetensors" for s in (2, 4, 6, 8)),
        *(f"out-step{s:08d}-state.pt" for s in (2, 4, 6, 8)),
        "out.safetensors",
        "out-state.pt",
    ]
    outputs, on_output = recorder()
    result = run(root, tmp_path, config, on_output=on_output, uploadable=set(expected_names))  # every URL: runs

    steps = [(kind, name, step, removed) for kind, name, step, removed in outputs]
    assert steps == [
        ("model", "out-step00000002.safetensors", 2, False),
        ("state", "out-step00000002-state.pt", 2, False),
        ("model", "out-step00000004.safetensors", 4, False),
        ("state", "out-step00000004-state.pt", 4, False),
        ("model", "out-step00000006.safetensors", 6, False),
        ("state", "out-step00000006-state.pt", 6, False),
        ("state", "out-step00000002-state.pt", 6, True),
        ("model", "out-step00000008.safetensors", 8, False),
        ("state", "out-step00000008-state.pt", 8, False),
        ("state", "out-step00000004-state.pt", 8, True),
        ("model", "out-step00000002.safetensors", 8, True),
        ("model", "out.safetensors", 8, False),
        ("state", "out-state.pt", 8, False),
    ]
    kept = [
        "out-state.pt",
        "out-step00000004.safetensors",
        "out-step00000006-state.pt",
        "out-step00000006.safetensors",
        "out-step00000008-state.pt",
        "out-step00000008.safetensors",
        "out.safetensors",
    ]
    assert names(tmp_path / "out") == kept
    assert sorted(p.name for p in result.files) == kept
    # a step file is the LoRA at its step: the last step's equals the final file; its metadata names the step
    # and, as kohya writes it, the epochs done before the step's epoch (its 0-based epoch)
    out = tmp_path / "out"
    assert same_tensors(out / "out-step00000008.safetensors", out / "out.safetensors")
    with safe_open(str(out / "out-step00000004.safetensors"), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("4", "0")
    with safe_open(str(out / "out-step00000006.safetensors"), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == ("6", "1")

    # and the step 4 file is what a run of 4 steps ends with
    short = tmp_path / "short"
    short.mkdir()
    run(root, short, config_with(short, **STEPS, max_train_epochs=None, max_train_steps=4))
    assert same_tensors(out / "out-step00000004.safetensors", short / "out" / "out.safetensors")
    assert not same_tensors(out / "out-step00000004.safetensors", out / "out-step00000006.safetensors")


def test_uploadable_without_a_step_file_fails_before_the_first_step(root, tmp_path):  # noqa: F811
    config = config_with(tmp_path, **STEPS, save_every_n_steps=1)
    every = output_file_names(TrainingConfig.from_toml(config), 2, 8)
    progress: list[dict] = []
    bounded = [name for name in every if name not in ("out-step00000006.safetensors", "out-step00000008.safetensors")]
    with pytest.raises(TrainingError) as refused:
        run(root, tmp_path, config, on_progress=progress.append, uploadable=bounded)
    assert str(refused.value) == (
        "save_every_n_steps = 1 makes 8 step saves: this job has no upload URL for out-step00000006.safetensors and "
        "1 more (the server presigns a bounded number of step saves)"
    )
    assert progress == []  # refused before the first step, and before anything was written
    assert names(tmp_path / "out") == []
    with pytest.raises(TrainingError, match=r"^the run ends with its final file: .* for out\.safetensors$"):
        run(root, tmp_path, config, uploadable=every[:-1])


# --- resuming from a step state ---------------------------------------------------------------------------------


def losses_of(base: Path, folder: Path, config: Path, **kwargs) -> tuple[list[tuple[int, float]], object]:
    seen: list[tuple[int, float]] = []
    result = run(base, folder, config, on_progress=lambda info: seen.append((info["step"], info["loss"])), **kwargs)
    return seen, result


def assert_same_losses(resumed: list[tuple[int, float]], unbroken: list[tuple[int, float]]) -> None:
    assert [step for step, _ in resumed] == [step for step, _ in unbroken]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in unbroken], rel=1e-5)


def stop_after(step: int) -> dict:
    """``on_progress`` / ``should_stop`` that cancel the run once ``step`` steps are done."""
    stop = {"now": False}
    return {"on_progress": lambda info: stop.update(now=info["step"] >= step), "should_stop": lambda: stop["now"]}


@pytest.mark.parametrize(
    ("options", "stop_at", "total"),
    [
        # 4 steps an epoch; stopped at step 3, inside epoch 1 (3 of its 4 batches done)
        ({"max_train_epochs": 2, "save_every_n_steps": 3, "save_last_n_steps": 2}, 3, 8),
        # gradient accumulation 2: 2 steps (4 batches) an epoch; stopped after step 1 = batch 2 of epoch 1
        ({"max_train_epochs": 2, "save_every_n_steps": 1, "gradient_accumulation_steps": 2}, 1, 4),
        # kohya's buckets (one here, 64x64): the epoch's batches come from the bucket shuffles; stopped at step 2
        (
            {
                "max_train_epochs": 2,
                "save_every_n_steps": 2,
                "enable_bucket": True,
                "min_bucket_reso": 64,
                "max_bucket_reso": 128,
            },
            2,
            8,
        ),
    ],
    ids=["mid-epoch", "accumulation", "buckets"],
)
def test_resume_from_a_mid_epoch_step_state_continues_as_the_unbroken_run(
    root,  # noqa: F811
    tmp_path,
    options,
    stop_at,
    total,
):
    full_dir, first_dir, second_dir = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    for folder in (full_dir, first_dir, second_dir):
        folder.mkdir()
    options = {**RANDOM, **options, "save_state": True, "save_every_n_epochs": 1}
    full_losses, full = losses_of(root, full_dir, config_with(full_dir, **options))
    assert [step for step, _ in full_losses] == list(range(1, total + 1))

    with pytest.raises(TrainingCancelled):
        run(root, first_dir, config_with(first_dir, **options), **stop_after(stop_at))
    state = first_dir / "out" / f"out-step{stop_at:08d}-state.pt"
    assert state.is_file() and not list((first_dir / "out").glob("out-0*"))  # no epoch save yet: mid-epoch

    # what the resumed run writes: the names after step stop_at only (uploadable lacks the earlier ones)
    config = config_with(second_dir, **options, resume=str(state))
    parsed = TrainingConfig.from_toml(config)
    every = parsed.save_every_n_steps
    earlier = {parsed.step_file(s) for s in range(every, stop_at + 1, every)}
    earlier |= {parsed.step_state_file(s) for s in range(every, stop_at + 1, every)}
    uploadable = [name for name in output_file_names(parsed, 2, total) if name not in earlier]
    outputs, on_output = recorder()
    resumed_losses, resumed = losses_of(root, second_dir, config, on_output=on_output, uploadable=uploadable)

    assert_same_losses(resumed_losses, full_losses[stop_at:])
    assert resumed.steps == full.steps == total
    last = total - total % every
    for name in ("out.safetensors", "out-000001.safetensors", f"out-step{last:08d}.safetensors"):
        assert same_tensors(full_dir / "out" / name, second_dir / "out" / name), name
    # the rotation leaves the files an unbroken run leaves: the run before's plus this one's, less what went
    left = (set(names(first_dir / "out")) | set(names(second_dir / "out"))) - {
        name for _, name, _, removed in outputs if removed
    }
    assert left == set(names(full_dir / "out"))
    if options.get("save_last_n_steps") == 2:  # step 6 removes step 3 (6 - 2 - 1 = 3), the run before's save
        assert ("state", "out-step00000003-state.pt", 6, True) in outputs
        assert ("model", "out-step00000003.safetensors", 6, True) in outputs
        assert "out-step00000003.safetensors" not in names(full_dir / "out")


def test_resume_from_a_step_state_at_an_epochs_end_still_saves_that_epoch(root, tmp_path):  # noqa: F811
    """A step save at the last batch of an epoch comes before that epoch's own save (kohya's order): a resume from
    it writes the epoch file the run before had not reached, equal to the unbroken run's."""
    full_dir, first_dir, second_dir = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    for folder in (full_dir, first_dir, second_dir):
        folder.mkdir()
    options = {**RANDOM, "max_train_epochs": 2, "save_every_n_steps": 4, "save_state": True}
    full_losses, _ = losses_of(root, full_dir, config_with(full_dir, **options))

    def stop_in_the_step_save(info: dict) -> None:
        if info["kind"] == "state" and info["path"].name == "out-step00000004-state.pt":
            raise RuntimeError("stopped before the epoch's end")

    with pytest.raises(RuntimeError):
        run(root, first_dir, config_with(first_dir, **options), on_output=stop_in_the_step_save)
    assert "out-000001.safetensors" not in names(first_dir / "out")
    state = first_dir / "out" / "out-step00000004-state.pt"
    resumed_losses, _ = losses_of(root, second_dir, config_with(second_dir, **options, resume=str(state)))
    assert_same_losses(resumed_losses, full_losses[4:])
    assert same_tensors(full_dir / "out" / "out-000001.safetensors", second_dir / "out" / "out-000001.safetensors")
    assert same_tensors(full_dir / "out" / "out.safetensors", second_dir / "out" / "out.safetensors")
