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
# A1111's built-in model upscalers -> the stem of the file A1111 downloads for each (an uploaded file of that
# name answers to both names). LDSR and the SD x4 upscaler are diffusion models, not spandrel's: refused.
UPSCALER_FILES = {
    "ESRGAN_4x": "ESRGAN_4x",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "DAT x2": "DAT_x2",
    "DAT x3": "DAT_x3",
    "DAT x4": "DAT_x4",
    "SwinIR 4x": "SwinIR_4x",
    "ScuNET GAN": "scunet_color_real_gan",
    "ScuNET PSNR": "scunet_color_real_psnr",
}
_MODEL_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")


def file_stem(name: str) -> str:
    """The file stem an upscaler name stands for, A1111's way: a file name without its extension, or a built-in
    name's file; the ``[hash]`` suffix of UI titles is dropped."""
    name = name.split(" [")[0].strip()
    name = UPSCALER_FILES.get(name, name)
    return name.rsplit(".", 1)[0] if name.lower().endswith(_MODEL_SUFFIXES) else name


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
    upscalers = extras_upscaler_names(params) if task.startswith("extra-") else hires_upscaler_names(task, params)
    if upscalers:
        names["ESRGAN"] = list(dict.fromkeys(file_stem(name) for name in upscalers))
    names = {k: v for k, v in names.items() if v}
    if str(params.get("script_name") or "").lower() == XYZ_SCRIPT:
        for model_type, found in xyz_model_names(task, params.get("script_args")).items():
            for name in found:
                if name not in names.setdefault(model_type, []):
                    names[model_type].append(name)
    return names


def extras_upscaler_names(params: dict) -> list[str]:
    """The model upscalers an extras request names: ``upscaler_1`` and ``upscaler_2`` that are not PIL's (A1111
    looks both up, so an unknown second upscaler fails even at visibility 0)."""
    from gpu_runtime.protocol.policy import PIL_UPSCALERS

    names = []
    for field in ("upscaler_1", "upscaler_2"):
        name = str(params.get(field) or "None").split(" [")[0]
        if name not in PIL_UPSCALERS and name not in names:
            names.append(name)
    return names


def hires_upscaler_names(task: str, params: dict) -> list[str]:
    """The model upscaler of a txt2img hires fix (``hr_upscaler`` that is neither a latent mode nor PIL's)."""
    from gpu_runtime.protocol.policy import HIRES_UPSCALERS

    if task != "txt2img" or params.get("enable_hr") is not True:
        return []
    name = str(params.get("hr_upscaler") or "Latent").split(" [")[0]
    return [] if name in HIRES_UPSCALERS else [name]


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
