"""kohya's training state (``save_state``, ``save_state_on_train_end``, ``save_last_n_epochs_state``,
``save_last_n_steps_state``, ``resume``)
as one file per save, so a run continues exactly where a saved one stopped.

Why one file and not kohya's accelerate folder (``{output_name}-{epoch:06d}-state/``): the runtime uploads each
output through its own presigned URL, so a state must be a single file, ``{output_name}-{epoch:06d}-state.pt``,
``{output_name}-step{step:08d}-state.pt`` (``save_every_n_steps``) or ``{output_name}-state.pt``. It holds what the
next steps depend on: the LoRA weights (full precision), the optimizer, LR-schedule and gradient-scaler state, the
step/epoch counters, every RNG the loop draws from (torch's global RNG for the dropouts, the CPU generator for the
noise, the ``random.Random`` for captions and augmentations, the bucket shuffle position), the losses so far and
the config and dataset it was trained with, so that a resume with a config that would train differently is refused,
naming the keys. A step state saved inside an epoch also holds where in the epoch it is (``batch``: the batches
done), that epoch's batches in their order (its shuffle was drawn from RNGs that have moved on since) and the
epoch's losses so far; an epoch-end state has ``batch`` None (older states have no such key and mean the same).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.errors import TrainingError

STATE_FORMAT = "esd-lora-state-1"
# Keys that change which files are written, not what is trained: a resume may differ in them.
_NOT_COMPARED = frozenset(
    {
        "output_name",
        "save_every_n_epochs",
        "save_last_n_epochs",
        "save_model_as",
        "save_precision",
        "save_state",
        "save_state_on_train_end",
        "save_last_n_epochs_state",
        "save_every_n_steps",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "save_n_epoch_ratio",
        "resume",
        "training_comment",
    }
)


def _comparable(raw: Mapping[str, Any], ignored: frozenset[str] | set[str]) -> dict[str, str]:
    """The config keys that shape the training, as JSON text (a state compares them one by one)."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in raw.items() if k not in ignored}


def config_differences(
    saved: Mapping[str, str], raw: Mapping[str, Any], ignored: frozenset[str] | set[str]
) -> list[str]:
    """The keys whose value differs between the saved config and this one (a key set on one side only counts)."""
    now = _comparable(raw, ignored)
    return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))


def dataset_digest(images: list[Any]) -> str:
    """What the dataset looked like to the run: file names, repeats, captions and buckets (not pixel data, which
    would cost a pass over every image), the regularization images marked as such (the training images' entries
    are the ones of a run without them, so their digests stay as they were)."""
    entries = []
    for i in images:
        entry = [i.folder, i.path.name, i.repeats, i.caption, list(i.bucket)]
        entries.append([*entry, "reg"] if getattr(i, "is_reg", False) else entry)
    text = json.dumps(entries)
    return hashlib.sha256(text.encode()).hexdigest()


def load_state(path: Path) -> dict[str, Any]:
    """Read a state file written by :func:`save_state`; a missing or foreign file is a clear error."""
    path = Path(path)
    if path.is_dir():
        raise TrainingError(
            f"resume {path} is a folder: this trainer resumes from its own single-file state "
            "({output_name}-{epoch:06d}-state.pt), not from kohya's accelerate state folders"
        )
    if not path.is_file():
        raise TrainingError(f"resume state {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip or torch errors
        raise TrainingError(f"resume state {path} could not be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"resume state {path} is not a training state written by this trainer")
    return state


def check_state(
    state: Mapping[str, Any], raw: Mapping[str, Any], ignored: frozenset[str] | set[str], digest: str
) -> None:
    """Refuse a resume that would not continue the saved training: a config key or the dataset differs."""
    differing = config_differences(state["config"], raw, ignored | _NOT_COMPARED)
    if differing:
        raise TrainingError(
            f"resume: the config differs from the saved state's in {', '.join(differing)}; resume with the same "
            "training options"
        )
    if state["dataset"] != digest:
        raise TrainingError(
            "resume: the dataset (files, repeats, captions or buckets; the regularization images included) differs "
            "from the saved state's"
        )


def rng_states(generator: torch.Generator, rng: random.Random, device: str) -> dict[str, Any]:
    """Every RNG the loop draws from, as plain values ``torch.load(weights_only=True)`` reads back."""
    version, internal, gauss = rng.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "random": [version, list(internal), gauss],
    }
    if device.startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return states


def restore_rngs(states: Mapping[str, Any], generator: torch.Generator, rng: random.Random, device: str) -> None:
    """Put the RNGs back where :func:`rng_states` found them."""
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    version, internal, gauss = states["random"]
    rng.setstate((version, tuple(internal), gauss))
    if device.startswith("cuda") and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], torch.device(device))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write one state file atomically (a half-written state must never be resumed from)."""
    state = {"format": STATE_FORMAT, **state}
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    partial.replace(path)


def comparable_config(raw: Mapping[str, Any], ignored: frozenset[str] | set[str]) -> dict[str, str]:
    """The saved form of the config (see :func:`check_state`)."""
    return _comparable(raw, ignored | _NOT_COMPARED)
