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
XYZ_FACE_RESTORE_AXIS = {"txt2img": 30, "img2img": 29}  # "Face restore": switches restore_faces per cell
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

# Face restoration, A1111 v1.8.0's way (modules/gfpgan_model.py, codeformer_model.py, face_restoration_utils.py):
# restorer name -> (checkpoint type, the file pattern A1111 takes from that model folder). facexlib's face detector
# and parser are read from A1111's GFPGAN folder under the names facexlib downloads them as, so here they are files
# of GFPGAN checkpoints with exactly those names. A pattern matches the newest visible file (never a helper file).
FACE_RESTORERS = {"CodeFormer": ("Codeformer", "*.pth"), "GFPGAN": ("GFPGAN", "*GFPGAN*.pth")}
FACE_DETECTION_FILE = "detection_Resnet50_Final.pth"
FACE_PARSING_FILE = "parsing_parsenet.pth"
FACE_HELPER_FILES = (FACE_DETECTION_FILE, FACE_PARSING_FILE)
DEFAULT_FACE_RESTORER = "CodeFormer"  # opts.face_restoration_model
DEFAULT_CODEFORMER_WEIGHT = 0.5  # opts.code_former_weight
# The rembg extension's models (its API's ``model``, "u2net" by default), each an uploaded ``<name>.onnx`` of type
# rembg, with the rembg session that reads that network without downloading it. u2net_cloth_seg (three masks)
# and the other rembg models are refused by name.
REMBG_SESSIONS = {
    "u2net": "u2net_custom",
    "u2netp": "u2net_custom",
    "u2net_human_seg": "u2net_custom",
    "silueta": "u2net_custom",
    "isnet-general-use": "dis_custom",
    "isnet-anime": "dis_custom",
}
DEFAULT_REMBG_MODEL = "u2net"


def rembg_model(params: dict) -> str:
    """The rembg model a request names (A1111's extension defaults to u2net)."""
    return str(params.get("model") or DEFAULT_REMBG_MODEL)


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def face_restorer_names(task: str, params: dict, plot: bool = False) -> list[str]:
    """The face restorers a job runs: ``restore_faces`` (or ``opts.face_restoration``) runs
    ``opts.face_restoration_model`` after decoding; extras run GFPGAN then CodeFormer at a positive visibility.
    ``plot``: also when an x/y/z plot's "Face restore" axis turns it on in some cell."""
    if task.startswith("extra-"):
        wanted = [("GFPGAN", "gfpgan_visibility"), ("CodeFormer", "codeformer_visibility")]
        return [name for name, field in wanted if _positive_number(params.get(field))]
    if task not in ("txt2img", "img2img"):
        return []
    overrides = params.get("override_settings")
    overrides = overrides if isinstance(overrides, dict) else {}
    restore = params.get("restore_faces")
    if restore is None:
        restore = overrides.get("face_restoration", False)
    if restore is not True and not (plot and _xyz_restores_faces(task, params)):
        return []
    return [str(overrides.get("face_restoration_model") or DEFAULT_FACE_RESTORER)]


def _xyz_restores_faces(task: str, params: dict) -> bool:
    """Whether an x/y/z plot's "Face restore" axis turns restoration on in some cell (A1111's values)."""
    if str(params.get("script_name") or "").lower() != XYZ_SCRIPT:
        return False
    args = params.get("script_args")
    if not isinstance(args, Sequence) or isinstance(args, str) or len(args) not in (15, 18):
        return False
    for offset in (0, 3, 6):
        kind, text = args[offset : offset + 2]
        if kind == XYZ_FACE_RESTORE_AXIS.get(task) and not isinstance(kind, bool):  # no choices: the text counts
            words = {v.strip().lower() for row in csv.reader(io.StringIO(str(text or ""))) for v in row}
            if words & {"codeformer", "gfpgan", "true", "yes", "y", "1"}:
                return True
    return False


def face_model_names(restorers: Sequence[str]) -> dict[str, list[str]]:
    """The files the restorers need, as ``named_models`` lists them: each restorer's pattern and the helper files."""
    names: dict[str, list[str]] = {}
    for restorer in restorers:
        if restorer in FACE_RESTORERS:
            model_type, pattern = FACE_RESTORERS[restorer]
            names.setdefault(model_type, []).append(pattern)
    if names:
        names.setdefault("GFPGAN", []).extend(FACE_HELPER_FILES)
    return names


def file_stem(name: str) -> str:
    """The file stem an upscaler name stands for, A1111's way: a file name without its extension, or a built-in
    name's file; the ``[hash]`` suffix of UI titles is dropped."""
    name = name.split(" [")[0].strip()
    name = UPSCALER_FILES.get(name, name)
    return name.rsplit(".", 1)[0] if name.lower().endswith(_MODEL_SUFFIXES) else name


def named_models(task: str, params: Any) -> dict[str, list[str]]:
    """Every model file the A1111 parameters name outside ``models``: ``refiner_checkpoint``, the enabled
    ControlNet units' models, model upscalers, face restorers (with facexlib's helper files) and an x/y/z plot's
    checkpoint, VAE and refiner axes."""
    if not isinstance(params, dict):
        return {}
    names: dict[str, list[str]] = {}
    refiner = params.get("refiner_checkpoint")
    if isinstance(refiner, str) and refiner.split(" [")[0] not in _NO_FILE:
        names["Stable-diffusion"] = [refiner.split(" [")[0]]
    for model in controlnet_models(params.get("alwayson_scripts")):
        if model not in names.setdefault("ControlNet", []):
            names["ControlNet"].append(model)
    for annotator in controlnet_annotator_files(params.get("alwayson_scripts")):
        if annotator not in names.setdefault("ControlNetAnnotator", []):
            names["ControlNetAnnotator"].append(annotator)
    if task == "rembg":
        return {"rembg": [rembg_model(params)]} if rembg_model(params) in REMBG_SESSIONS else {}
    upscalers = extras_upscaler_names(params) if task.startswith("extra-") else hires_upscaler_names(task, params)
    if upscalers:
        names["ESRGAN"] = list(dict.fromkeys(file_stem(name) for name in upscalers))
    for model_type, found in face_model_names(face_restorer_names(task, params, plot=True)).items():
        names.setdefault(model_type, []).extend(found)
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


def _enabled_units(scripts: Any) -> list[dict]:
    """The enabled ControlNet units of ``alwayson_scripts`` (a unit without ``enabled`` is on, as in the
    extension); malformed entries give none, the runtime refuses them with the reason."""
    if not isinstance(scripts, dict):
        return []
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    from gpu_runtime.protocol.policy import CONTROLNET_MAX_UNITS

    units = entry.get("args") if isinstance(entry, dict) else None
    units = units[:CONTROLNET_MAX_UNITS] if isinstance(units, list) else []  # the runtime uses no more
    return [u for u in units if isinstance(u, dict) and u.get("enabled", True) is not False]


def controlnet_models(scripts: Any) -> list[str]:
    """The models of the enabled ControlNet units."""
    models = [str(unit.get("model") or "None").split(" [")[0] for unit in _enabled_units(scripts)]
    return [model for model in models if model not in _NO_FILE]


# ControlNet module (as the runtime names it) -> the annotator file the extension downloads for it
ANNOTATOR_FILES = {
    "hed": "ControlNetHED.pth",
    "hed_safe": "ControlNetHED.pth",
    "scribble_hed": "ControlNetHED.pth",
    "lineart": "sk_model.pth",
    "lineart_coarse": "sk_model2.pth",
}


def controlnet_annotator_files(scripts: Any) -> list[str]:
    """The annotator files the enabled ControlNet units' preprocessors need (sent like the units' models)."""
    from gpu_runtime.protocol.policy import CONTROLNET_MODULES

    found = []
    for unit in _enabled_units(scripts):
        module = unit.get("module", "none")
        name = ANNOTATOR_FILES.get(CONTROLNET_MODULES.get(module, "")) if isinstance(module, str) else None
        if name and name not in found:
            found.append(name)
    return found


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
