"""What the control plane must know of a job's parameters before it dispatches: the model files they name outside
``models`` (the refiner; an x/y/z plot's Checkpoint name, VAE and Refiner checkpoint axes), so they are resolved
for the job's owner and sent with the job like the models of ``POST /inferences``. Standard library only; the
runtime's ``gpu_runtime.xyz`` runs the plot itself and uses these indices too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

XYZ_SCRIPT = "x/y/z plot"
# A1111 v1.8.0 axis index -> model type, per tab (the img2img list drops the three hires axes before them).
XYZ_MODEL_AXES: dict[str, dict[int, str]] = {
    "txt2img": {11: "Stable-diffusion", 27: "VAE", 35: "Stable-diffusion"},
    "img2img": {10: "Stable-diffusion", 26: "VAE", 34: "Stable-diffusion"},
}
_NO_FILE = ("", "None", "Automatic", "Nothing")


def named_models(task: str, params: Any) -> dict[str, list[str]]:
    """Every model file the A1111 parameters name outside ``models``: ``refiner_checkpoint``, the enabled
    ControlNet units' models and an x/y/z plot's checkpoint, VAE and refiner axes."""
    if not isinstance(params, dict):
        return {}
    names: dict[str, list[str]] = {}
    refiner = params.get("refiner_checkpoint")
    if isinstance(refiner, str) and refiner.split(" [")[0] not in _NO_FILE:
        names["Stable-diffusion"] = [refiner.split(" [")[0]]
    for model in controlnet_models(params.get("alwayson_scripts")):
        if model not in names.setdefault("ControlNet", []):
            names["ControlNet"].append(model)
    names = {k: v for k, v in names.items() if v}
    if str(params.get("script_name") or "").lower() == XYZ_SCRIPT:
        for model_type, found in xyz_model_names(task, params.get("script_args")).items():
            for name in found:
                if name not in names.setdefault(model_type, []):
                    names[model_type].append(name)
    return names


def controlnet_models(scripts: Any) -> list[str]:
    """The models of the enabled ControlNet units (a unit without ``enabled`` is on, as in the extension)."""
    if not isinstance(scripts, dict):
        return []
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    units = entry.get("args") if isinstance(entry, dict) else None
    models = []
    for unit in units if isinstance(units, list) else []:
        if isinstance(unit, dict) and unit.get("enabled", True) is not False:
            model = str(unit.get("model") or "None").split(" [")[0]
            if model not in _NO_FILE:
                models.append(model)
    return models


def xyz_model_names(task: str, script_args: Any) -> dict[str, list[str]]:
    """Model names per type on the axes of an x/y/z plot's ``script_args`` (15- or 18-argument layout); the
    values come from the dropdown lists unless ``csv_mode`` (the last argument) is on. Malformed arguments give
    no names: the runtime refuses them with the reason."""
    if not isinstance(script_args, Sequence) or isinstance(script_args, str) or len(script_args) not in (15, 18):
        return {}
    axes = XYZ_MODEL_AXES.get(task, {})
    csv_mode = bool(script_args[-1])
    names: dict[str, list[str]] = {}
    for offset in (0, 3, 6):
        kind, text, dropdown = script_args[offset : offset + 3]
        model_type = axes.get(kind) if isinstance(kind, int) and not isinstance(kind, bool) else None
        if model_type is None:
            continue
        if not csv_mode and isinstance(dropdown, list) and dropdown:
            values = [str(v) for v in dropdown]
        else:
            values = [v.strip() for row in csv.reader(io.StringIO(str(text or ""))) for v in row]
        for value in values:
            value = value.split(" [")[0]  # A1111's titles: "name.safetensors [hash]"
            if value not in _NO_FILE and value not in names.setdefault(model_type, []):
                names[model_type].append(value)
    return {k: v for k, v in names.items() if v}
