"""kohya's training state on the tiny model, on CPU: ``save_state`` writes one state file per saved epoch (and at
the end), ``save_last_n_epochs_state`` keeps the last N, and ``resume`` continues bit-exactly as the uninterrupted
run; a resume with a different config or a missing state is refused, named."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from safetensors.torch import load_file

from gpu_runtime.trainer import TrainingCancelled, TrainingConfig, TrainingError, output_file_names
from tests.gpu_runtime.test_trainer import config_with, root, run  # noqa: F401  (root is a fixture)

# 4 images x 2 repeats / batch 2 = 4 steps an epoch; an epoch of 1 step keeps the runs short
ONE_STEP_EPOCHS = {"train_batch_size": 8, "cache_latents": False, "flip_aug": True, "shuffle_caption": True}


def losses_of(base: Path, tmp_path: Path, config: Path) -> tuple[list[tuple[int, float]], object]:
    """Run ``config`` and collect ``(step, loss)`` from every progress report."""
    seen: list[tuple[int, float]] = []
    result = run(base, tmp_path, config, on_progress=lambda info: seen.append((info["step"], info["loss"])))
    return seen, result


def test_resume_continues_bit_exactly(root, tmp_path):  # noqa: F811
    full_dir, first_dir, second_dir = tmp_path / "full", tmp_path / "first", tmp_path / "second"
    for folder in (full_dir, first_dir, second_dir):
        folder.mkdir()
    options = {**ONE_STEP_EPOCHS, "max_train_epochs": 4, "network_dropout": 0.1}
    full_losses, full = losses_of(root, full_dir, config_with(full_dir, **options))
    assert [step for step, _ in full_losses] == [1, 2, 3, 4]

    # the interrupted run: the same config with save_state, stopped after epoch 2 (cancelled at step 3)
    first_config = config_with(first_dir, **options, save_state=True, save_last_n_epochs_state=3)
    stop = {"now": False}

    def stop_after_two(info: dict) -> None:
        stop["now"] = info["step"] >= 2

    with pytest.raises(TrainingCancelled):
        run(root, first_dir, first_config, on_progress=stop_after_two, should_stop=lambda: stop["now"])
    state = first_dir / "out" / "out-000002-state.pt"
    assert sorted(p.name for p in (first_dir / "out").glob("*-state.pt")) == ["out-000001-state.pt", state.name]

    # resumed with another output name and save options (they write files, they do not train): steps 3 and 4
    resumed_losses, resumed = losses_of(
        root, second_dir, config_with(second_dir, **options, resume=str(state), output_name="again")
    )
    assert resumed_losses == full_losses[2:]
    assert resumed.steps == full.steps == 4 and resumed.loss == full.loss
    final, again = load_file(full_dir / "out" / "out.safetensors"), load_file(second_dir / "out" / "again.safetensors")
    assert final.keys() == again.keys()
    assert all(final[k].equal(again[k]) for k in final)


def test_save_last_n_epochs_state_keeps_the_last_n_and_the_final_state(root, tmp_path):  # noqa: F811
    config = config_with(
        tmp_path,
        **ONE_STEP_EPOCHS,
        max_train_epochs=4,
        save_state=True,
        save_last_n_epochs=1,
        save_last_n_epochs_state=2,
    )
    parsed = TrainingConfig.from_toml(config)
    assert output_file_names(parsed, 4) == [
        *(f"out-{e:06d}.safetensors" for e in (1, 2, 3)),
        *(f"out-{e:06d}-state.pt" for e in (1, 2, 3)),
        "out.safetensors",
        "out-state.pt",
    ]
    result = run(root, tmp_path, config)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    # the model files keep save_last_n_epochs = 1, the states save_last_n_epochs_state = 2 (kohya's override)
    expected = ["out-000002-state.pt", "out-000003-state.pt", "out-000003.safetensors", "out-state.pt"]
    assert names == sorted([*expected, "out.safetensors"])
    assert sorted(p.name for p in result.files) == names
    assert result.files[-1].name == "out-state.pt"

    # the final state is at the last step: there is nothing to resume
    again = tmp_path / "again"
    again.mkdir()
    resume_end = config_with(again, **ONE_STEP_EPOCHS, max_train_epochs=4, resume=str(tmp_path / "out/out-state.pt"))
    with pytest.raises(TrainingError, match="nothing is left"):
        run(root, again, resume_end)


def test_resume_refuses_a_changed_config_and_a_missing_state(root, tmp_path):  # noqa: F811
    first = tmp_path / "first"
    first.mkdir()
    run(root, first, config_with(first, **ONE_STEP_EPOCHS, max_train_epochs=2, save_state_on_train_end=True))
    assert not list((first / "out").glob("*-000001-state.pt"))  # only save_state writes the epoch states
    state = first / "out" / "out-state.pt"
    assert state.is_file()

    # a state at step 1 of 2: resuming it with another learning rate would not be the same training
    epoch_one = tmp_path / "epoch"
    epoch_one.mkdir()
    run(root, epoch_one, config_with(epoch_one, **ONE_STEP_EPOCHS, max_train_epochs=2, save_state=True))
    mid = epoch_one / "out" / "out-000001-state.pt"
    changed = config_with(tmp_path, **ONE_STEP_EPOCHS, max_train_epochs=2, learning_rate=5e-3, resume=str(mid))
    with pytest.raises(TrainingError, match=r"differs from the saved state's in learning_rate;"):
        run(root, tmp_path, changed)

    missing = config_with(tmp_path, **ONE_STEP_EPOCHS, max_train_epochs=2, resume=str(tmp_path / "nope-state.pt"))
    with pytest.raises(TrainingError, match=r"resume state .*nope-state\.pt does not exist"):
        run(root, tmp_path, missing)
    with pytest.raises(TrainingError, match="is a folder"):
        run(root, tmp_path, config_with(tmp_path, **ONE_STEP_EPOCHS, max_train_epochs=2, resume=str(tmp_path)))


def test_a_resumed_run_rotates_out_the_files_of_the_run_before(root, tmp_path):  # noqa: F811
    """kohya removes ``epoch - n * save_every_n_epochs`` by name, so after a resume the files an unbroken run would
    have removed are removed too (reported to ``on_output``: they were saved by the run before, elsewhere)."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir(), second_dir.mkdir()
    options = {**ONE_STEP_EPOCHS, "max_train_epochs": 4, "save_state": True, "save_last_n_epochs": 1}
    stop = {"now": False}
    with pytest.raises(TrainingCancelled):
        run(
            root,
            first_dir,
            config_with(first_dir, **options),
            on_progress=lambda info: stop.update(now=info["step"] >= 2),
            should_stop=lambda: stop["now"],
        )
    state = first_dir / "out" / "out-000002-state.pt"
    outputs: list[tuple[str, str, bool]] = []
    run(
        root,
        second_dir,
        config_with(second_dir, **options, resume=str(state)),
        on_output=lambda info: outputs.append((info["kind"], info["path"].name, info["removed"])),
    )
    # epoch 3 is saved, then epoch 2's file and state (the first run's) are rotated out, as without the break
    assert outputs[:4] == [
        ("model", "out-000003.safetensors", False),
        ("model", "out-000002.safetensors", True),
        ("state", "out-000003-state.pt", False),
        ("state", "out-000002-state.pt", True),
    ]
    assert outputs[4:] == [("model", "out.safetensors", False), ("state", "out-state.pt", False)]
