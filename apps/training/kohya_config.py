"""kohya configurations: the shipped templates, merging a job's ``config_params`` into them, writing TOML.

kohya flattens all tables of its config file into one namespace, so where a key sits only matters to people
reading the file; we keep ESD's sections so files look like ESD's.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from apps.training.choices import FM_TYPES
from esd import keys
from esd.storage import blob_store

TEMPLATES = Path(__file__).resolve().parent / "kohya"


def load_template(fm_type: str) -> dict[str, dict[str, Any]]:
    """The template of a model family: an operator's override at ``template/{name}`` in storage, else ours."""
    name = FM_TYPES[fm_type]
    store = blob_store()
    override = keys.kohya_template(name)
    if store.exists(override):
        return tomllib.loads(store.read_bytes(override).decode("utf-8"))
    return tomllib.loads((TEMPLATES / name).read_text())


def merge_native(template: dict[str, dict], config_params: dict[str, Any]) -> dict[str, dict]:
    """The WebUI's form: ``config_params`` is sections of kohya keys, merged over the template's sections."""
    merged = {section: dict(values) for section, values in template.items()}
    for section, values in config_params.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
    return merged


def merge_document(template: dict[str, dict], training: dict[str, Any], default_name: str) -> dict[str, dict]:
    """The 1.5.0 document's form: a flat ``training`` table; each key lands where the template holds it."""
    merged = {section: dict(values) for section, values in template.items()}
    merged.setdefault("saving_arguments", {})["output_name"] = default_name
    homes = {
        "output_name": "saving_arguments",
        "save_every_n_epochs": "saving_arguments",
        "max_train_epochs": "training_arguments",
    }
    for key, value in training.items():
        section = homes.get(key) or next((s for s, v in merged.items() if key in v), "training_arguments")
        merged.setdefault(section, {})[key] = value
    return merged


def config_params_of(merged: dict[str, dict], given: dict[str, Any]) -> dict[str, Any]:
    """What the API shows as ``config_params``: the given sections, always with saving_arguments.output_name."""
    shown = {section: dict(values) for section, values in given.items() if isinstance(values, dict)}
    saving = shown.setdefault("saving_arguments", {})
    saving.setdefault("output_name", merged["saving_arguments"]["output_name"])
    return shown


def flatten(config: dict[str, dict]) -> dict[str, Any]:
    return {key: value for values in config.values() for key, value in values.items()}


# The kohya keys that decide which files a run writes: whole numbers from 1 (or unset), checked at creation
# (``check_saving``), since the server presigns an upload URL for each file they make.
SAVING_COUNTS = (
    "max_train_epochs",
    "max_train_steps",
    "save_every_n_epochs",
    "save_n_epoch_ratio",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_last_n_epochs_state",
    "save_last_n_steps",
    "save_last_n_steps_state",
)


def unset(value: Any) -> bool:
    """kohya's None as the trainer reads it: TOML has no null, so GUIs write empty strings (or "None")."""
    return value is None or (isinstance(value, str) and value.strip() in ("", "None", "none"))


def whole(flat: dict[str, Any], key: str) -> int | None:
    """A whole-number option read as the trainer reads it (numbers written as strings too); None when unset.
    Raises ValueError naming the key for anything else, or a number below 1."""
    value = flat.get(key)
    if unset(value):
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value) if isinstance(value, str) else value
        if not isinstance(number, int | float) or not math.isfinite(number) or number != int(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{key} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{key} must be at least 1, got {value!r}")
    return int(number)


def check_saving(config: dict[str, dict]) -> None:
    """What decides the files a run writes is readable here exactly as the trainer will read it (ValueError
    naming the key otherwise), so the URLs presigned for them are the ones the trainer needs."""
    flat = flatten(config)
    counts = {key: whole(flat, key) for key in SAVING_COUNTS}
    if counts["save_n_epoch_ratio"] and not counts["max_train_epochs"]:
        raise ValueError("save_n_epoch_ratio needs max_train_epochs (its saves depend on the number of epochs)")


def _count(flat: dict[str, Any], key: str) -> int | None:
    try:
        return whole(flat, key)
    except ValueError:  # refused at creation (check_saving); an operator's template is the trainer's to refuse
        return None


def expected_outputs(config: dict[str, dict], max_saves: int = 100) -> list[str]:
    """Every file a run may write, for a presigned PUT each (kohya's names, contract §9.8); with ``save_state`` a
    state beside each LoRA file, with ``save_state_on_train_end`` the final one (the trainer's one-file states).

    - epoch files ``{name}-{epoch:06d}`` where ``epoch % save_every_n_epochs == 0`` before the last epoch (kohya's
      ``save_n_epoch_ratio`` sets that period from the number of epochs);
    - step files ``{name}-step{step:08d}`` every ``save_every_n_steps`` steps;
    - the final file.
    The number of steps, and of epochs of a ``max_train_steps`` run, depends on the images' buckets, which only the
    trainer builds: saves are presigned up to ``max_saves`` of each kind (``ESD_TRAINING_MAX_SAVES``). The trainer
    checks, before its first step, that every file it will write has a URL, and fails the job naming the first
    one that has not, so a save is never dropped silently."""
    flat = flatten(config)
    name = flat["output_name"]
    epochs = _count(flat, "max_train_epochs")
    max_steps = None if epochs else (_count(flat, "max_train_steps") or 1600)
    ratio = _count(flat, "save_n_epoch_ratio")
    every = _count(flat, "save_every_n_epochs") or 1
    if ratio and epochs:
        every = max(1, math.floor(epochs / ratio))
    elif ratio:
        every = 1  # the period depends on the epochs: every epoch covers it
    last_epoch = epochs if epochs else max_steps  # at least a step an epoch: no more epochs than steps
    saved = [every * k for k in range(1, max_saves + 1) if every * k < last_epoch]
    names = [f"{name}-{epoch:06d}" for epoch in saved]
    if step_every := _count(flat, "save_every_n_steps"):
        names += [
            f"{name}-step{step_every * k:08d}"
            for k in range(1, max_saves + 1)
            if max_steps is None or step_every * k <= max_steps
        ]
    files = [f"{name}.safetensors"] + [f"{base}.safetensors" for base in names]
    if flat.get("save_state") is True:
        files += [f"{name}-state.pt"] + [f"{base}-state.pt" for base in names]
    elif flat.get("save_state_on_train_end") is True:
        files.append(f"{name}-state.pt")
    return files


def set_key(config: dict[str, dict], key: str, value: Any) -> None:
    """Set a kohya key in the section that holds it (kohya reads all sections as one namespace)."""
    section = next((s for s, values in config.items() if key in values), "training_arguments")
    config.setdefault(section, {})[key] = value


def samples_requested(config: dict[str, dict]) -> bool:
    """Whether the run makes sample images (kohya's triggers, with a prompt file)."""
    flat = flatten(config)
    triggers = ("sample_every_n_epochs", "sample_every_n_steps", "sample_at_first")
    return bool(flat.get("sample_prompts")) and any(flat.get(key) for key in triggers)


def dumps(config: dict[str, dict]) -> str:
    """TOML for tables of scalars and lists (all kohya configs need)."""
    lines: list[str] = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return (
            repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
        )
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value is None:
        return '""'
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    return _value(str(value))
