"""ControlNet units (the sd-webui-controlnet extension's ``alwayson_scripts.controlnet.args``) on diffusers'
ControlNet models and pipelines.

Why here and not in the policy: a unit names a model file and carries an image, so it can only be checked once the
job's files are known; the policy (``gpu_runtime.protocol.policy``) refuses what no file could make work. A unit's
ControlNet is built for the checkpoint it runs with: its architecture is derived from that checkpoint's UNet config
(``ControlNetModel.from_unet`` semantics), so no config file is shipped or downloaded, and the weights come from
the uploaded file - lllyasviel's LDM layout (``control_model.*``) or diffusers' (``controlnet_cond_embedding.*``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_runtime.errors import JobError
from gpu_runtime.images import decode_image, flatten, resize_image
from gpu_runtime.protocol import policy


@dataclass(frozen=True)
class ControlUnit:
    """One enabled unit, checked: its model file, preprocessor, weight, active span and control image."""

    model_name: str
    path: Path
    module: str
    weight: float
    start: float
    end: float
    resize_mode: int
    image: Any  # the unit's input (PIL, RGB); preprocessed per generation size by :func:`control_image`
    processor_res: float = -1
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    control_mode: int = 0  # policy.CONTROL_MODES: 0 Balanced, 1 My prompt is more important, 2 ControlNet is ...
    # the extension's global average pooling, decided by the file name alone ("shuffle" in its stem), SD 1.x/2.x
    global_pooling: bool = False
    mask: Any = None  # the inpaint modules' mask (PIL "L", 255 = repaint); None: nothing is masked
    annotator: Path | None = None  # the uploaded annotator file of a preprocessor that needs weights (hed, ...)


# The inpainting preprocessors leave the image as it is; the model sees it with the masked pixels at -1
# ("inpaint", shown as inpaint_global_harmonious). "inpaint_only" also keeps the unmasked area of the image, in
# the latents at every step and in the pixels at the end.
INPAINT_MODULES = ("inpaint", "inpaint_only")
INPAINT_BLUR = 7  # the extension's control_net_inpaint_blur_sigma: a box dilation and blur of this size


_RESIZE_MODES = {"Just Resize": 0, "Crop and Resize": 1, "Resize and Fill": 2, "Inner Fit (Scale to Fit)": 1}


def _number(unit: dict, name: str, default: float, low: float, high: float, index: int) -> float:
    value = unit.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise JobError(f"ControlNet unit {index}: {name} must be a number between {low:g} and {high:g}")
    return float(value)


def units_of(
    params: dict,
    files: dict[str, Path],
    init_images: list[Any],
    init_mask: Any = None,
    annotators: dict[str, Path] | None = None,
) -> list[ControlUnit]:
    """The enabled units of a request, with their model files (``files``: the job's ControlNet files by name).
    A unit whose weight is 0 changes nothing and is dropped; at most three units are used, as the extension.
    ``init_mask``: img2img's inpainting mask at the generation size, which inpaint units without an image of their
    own use with the init image (and which turns ``inpaint_only`` into ``inpaint``, as in the extension).
    ``annotators``: the job's ControlNetAnnotator files by name, for the preprocessors that need weights."""
    from gpu_runtime.protocol.scripts import ANNOTATOR_FILES

    scripts = params.get("alwayson_scripts") or {}
    entry = next((v for k, v in scripts.items() if str(k).lower() == "controlnet"), None)
    args = (entry or {}).get("args") or [] if isinstance(entry, dict) else []
    units = []
    for index, unit in enumerate(args[: policy.CONTROLNET_MAX_UNITS]):
        if not isinstance(unit, dict) or unit.get("enabled", True) is False:
            continue
        module = policy.controlnet_module(unit, index)
        name = str(unit.get("model") or "None").split(" [")[0]
        path = files.get(name) or next((p for n, p in files.items() if Path(n).stem == name), None)
        if name in ("", "None") or path is None:
            raise JobError(f"ControlNet unit {index}: model {name} was not sent with the job (upload it as ControlNet)")
        weight = _number(unit, "weight", 1.0, 0.0, 2.0, index)
        start = _number(unit, "guidance_start", 0.0, 0.0, 1.0, index)
        end = _number(unit, "guidance_end", 1.0, 0.0, 1.0, index)
        if start > end:
            raise JobError(f"ControlNet unit {index}: guidance_start must not exceed guidance_end")
        mode = unit.get("resize_mode", "Crop and Resize")
        resize = _RESIZE_MODES.get(mode, mode) if isinstance(mode, str) else mode
        if resize == 3:
            resize = 0
        if resize not in (0, 1, 2):
            raise JobError(f"ControlNet unit {index}: resize_mode {mode!r} is not one of {', '.join(_RESIZE_MODES)}")
        raw = unit.get("image") if unit.get("image") is not None else unit.get("input_image")
        raw_mask = unit.get("mask")
        if isinstance(raw, dict):
            raw, raw_mask = raw.get("image"), raw.get("mask") or raw_mask
        mask = None
        if raw:
            try:
                image = flatten(decode_image(raw))
                if raw_mask and module in INPAINT_MODULES:  # the mask's first channel, as the extension reads it
                    mask = decode_image(raw_mask).convert("RGB").getchannel(0)
            except Exception:
                raise JobError(f"ControlNet unit {index}: the image or its mask could not be decoded") from None
        elif raw_mask and module in INPAINT_MODULES:
            raise JobError(f"ControlNet unit {index}: a mask needs the unit's image")
        elif init_images:  # the extension's choose_input_image: img2img falls back to the init image
            image, mask = init_images[0], init_mask if module in INPAINT_MODULES else None
        else:
            raise JobError(f"ControlNet unit {index}: no image (txt2img needs the unit's image)")
        if module == "inpaint_only" and init_mask is not None:  # "A1111 inpaint and ControlNet inpaint duplicated"
            module = "inpaint"
        extra = {
            "processor_res": _number(unit, "processor_res", -1, -1, 2048, index),
            "threshold_a": _number(unit, "threshold_a", -1, -1, 1024, index),
            "threshold_b": _number(unit, "threshold_b", -1, -1, 1024, index),
            "pixel_perfect": bool(unit.get("pixel_perfect")),
            "control_mode": policy.control_mode(unit, index),
        }
        extra["global_pooling"] = "shuffle" in Path(name).stem.lower()
        extra["mask"] = mask
        if module in ANNOTATOR_FILES:
            extra["annotator"] = (annotators or {}).get(ANNOTATOR_FILES[module])
            if extra["annotator"] is None:
                raise JobError(
                    f"ControlNet unit {index}: module {module} needs the annotator file {ANNOTATOR_FILES[module]} "
                    "(upload it as a checkpoint of type ControlNetAnnotator)"
                )
        if weight > 0:
            units.append(ControlUnit(name, path, module, weight, start, end, int(resize), image, **extra))
    return units


def preprocessor_seed(params: dict, first_seed: int) -> int:
    """The seed the extension gives numpy before it preprocesses (the shuffle's noise): the request's seed plus
    its subseed, each the first image's seed when -1 (also the subseed), wrapped to 32 bits."""

    def value(name: str) -> int:
        raw = params.get(name, -1)
        if raw is None or raw == -1:
            return first_seed
        if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw) or abs(raw) >= 2**63:
            raise JobError(f"{name} must be an integer")
        return max(int(raw), 0)

    return (value("seed") + value("subseed")) & 0xFFFFFFFF


def inpaint_parts(unit: ControlUnit, width: int, height: int) -> tuple[Any, Any]:
    """An inpaint unit's image (float RGB in [0, 1]) and mask (1 = repaint) at the generation size: both resized
    by the unit's resize mode, the mask then cut at half (the extension's ``> 127``)."""
    import numpy as np

    rgb = np.asarray(resize_image(unit.resize_mode, unit.image.convert("RGB"), width, height), dtype=np.float32)
    if unit.mask is None:
        return rgb / 255.0, np.zeros((height, width), dtype=np.float32)
    mask = np.asarray(resize_image(unit.resize_mode, unit.mask.convert("RGB"), width, height))[:, :, 0]
    return rgb / 255.0, (mask > 127).astype(np.float32)


def control_image(unit: ControlUnit, width: int, height: int, seed: int = 0) -> Any:
    """The unit's detected map (its preprocessor at the processor resolution, or the pixel-perfect one), resized
    to the generation size with the unit's resize mode; ``seed`` (:func:`preprocessor_seed`) for random ones.
    An inpaint unit's map is a tensor: its image with the masked pixels at -1 (the extension's inpaint protocol)."""
    import numpy as np
    from PIL import Image

    from gpu_runtime import controlnet_preprocessors as pre

    if unit.module in INPAINT_MODULES:
        import torch

        rgb, mask = inpaint_parts(unit, width, height)
        hint = rgb * (1 - mask[:, :, None]) - mask[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(hint.transpose(2, 0, 1)))[None]

    resolution = unit.processor_res
    if unit.pixel_perfect:
        resolution = pre.pixel_perfect_resolution(
            (unit.image.height, unit.image.width), (height, width), unit.resize_mode
        )
    pixels = np.asarray(unit.image.convert("RGB"))
    detected = pre.run(unit.module, pixels, resolution, unit.threshold_a, unit.threshold_b, seed, unit.annotator)
    return resize_image(unit.resize_mode, Image.fromarray(detected), width, height)


def layer_scales(count: int) -> list[float]:
    """The extension's soft injection: residual ``i`` of ``count`` (the middle block last) is scaled by
    ``0.825 ** (count - 1 - i)``, so the deepest residual keeps the unit's weight and the first one ~0.1 of it."""
    return [0.825 ** float(count - 1 - i) for i in range(count)]


def control_mode_hook(pipe: Any, mode: int, pooling: bool = False) -> Callable[..., Any]:
    """A forward hook for one unit's ControlNet that applies its control mode to the residuals diffusers' pipeline
    computed (already times the unit's weight): "My prompt is more important" scales them by
    :func:`layer_scales`; "ControlNet is more important" does so too and drops them from the unconditional half
    of the batch (diffusers puts it first), so only the prompt's prediction is controlled. ``pooling`` (a shuffle
    model) drops the unconditional half too and averages each residual over its height and width."""
    import torch

    def hook(module: Any, args: Any, output: Any) -> Any:
        down, mid = output
        residuals = [*down, mid]  # 13 for SD 1.x/2.x (SDXL's 10 are refused: the extension's scales are for 13)
        if mode:
            residuals = [r * s for r, s in zip(residuals, layer_scales(len(residuals)), strict=True)]
        if (mode == 2 or pooling) and pipe.do_classifier_free_guidance:
            half = residuals[0].shape[0] // 2
            residuals = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in residuals]
        if pooling:
            residuals = [torch.mean(r, dim=(2, 3), keepdim=True) for r in residuals]
        return residuals[:-1], residuals[-1]

    return hook


def _is_diffusers_layout(keys: list[str]) -> bool:
    return any(key.startswith("controlnet_cond_embedding.") for key in keys)


def load(path: Path, unet: Any, configs: Path, dtype: Any, device: str) -> Any:
    """A ControlNet for ``unet``'s architecture with the weights of ``path`` (offline)."""
    import torch
    from diffusers import ControlNetModel
    from safetensors import safe_open

    base = dict(unet.config)
    config = {
        key: base[key]
        for key in (
            "in_channels",
            "flip_sin_to_cos",
            "freq_shift",
            "down_block_types",
            "only_cross_attention",
            "block_out_channels",
            "layers_per_block",
            "downsample_padding",
            "mid_block_scale_factor",
            "act_fn",
            "norm_num_groups",
            "norm_eps",
            "cross_attention_dim",
            "transformer_layers_per_block",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "attention_head_dim",
            "num_attention_heads",
            "use_linear_projection",
            "class_embed_type",
            "addition_embed_type",
            "addition_time_embed_dim",
            "num_class_embeds",
            "upcast_attention",
            "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim",
        )
        if key in base
    }
    config["in_channels"] = 4  # an inpainting checkpoint's ControlNets still see the latents alone
    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
    except Exception:
        raise JobError(f"ControlNet model {path.name} is not a readable safetensors file") from None
    try:
        if _is_diffusers_layout(keys):
            model = ControlNetModel.from_config(config)
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(path)))
        else:
            digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()[:12]
            folder = configs / f"controlnet-{digest}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", **config}))
            model = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise JobError(f"ControlNet model {path.name} does not fit this checkpoint: {str(exc)[:300]}") from None
    return model.to(device=device, dtype=dtype if dtype is not None else torch.float32).eval()


def pipeline(pipe: Any, controlnets: list[Any], image_to_image: bool, xl: bool) -> Any:
    """The ControlNet variant of a loaded pipeline, sharing every component (no copy of any weight)."""
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    names = {
        (False, False): "StableDiffusionControlNetPipeline",
        (False, True): "StableDiffusionControlNetImg2ImgPipeline",
        (True, False): "StableDiffusionXLControlNetPipeline",
        (True, True): "StableDiffusionXLControlNetImg2ImgPipeline",
    }
    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    components = {k: v for k, v in pipe.components.items() if k != "controlnet"}
    made = getattr(diffusers, names[(xl, image_to_image)])(**components, controlnet=controlnet)
    made.set_progress_bar_config(disable=True)
    return made


def inpaint_only_hooks(pipe: Any, units: list[ControlUnit], width: int, height: int, hooks: list[Any]) -> None:
    """The extension's ``inpaint_only`` latent blend, as hooks on the pipeline's models (removed after the call):
    while an inpaint_only unit is active (its ControlNet runs with a scale above 0), every noise prediction of the
    UNet is pulled, by the unit's weight (at most 1), towards the one whose x0 keeps the unit's image outside the
    mask (VAE-encoded; the mask max-pooled to the latents, 10 px windows every 8 px). Each hook is appended to
    ``hooks`` as it is registered, so the caller removes them even when a later one fails."""
    import numpy as np
    import torch

    from gpu_runtime.kdiffusion import ModelSigmas
    from gpu_runtime.vae import encode

    model = getattr(pipe.scheduler, "model", None)  # the k-diffusion samplers hold the checkpoint's noise levels
    model = model if isinstance(model, ModelSigmas) else ModelSigmas(dict(pipe.scheduler.config))
    if model.v_prediction:
        raise JobError("ControlNet inpaint_only is supported with epsilon-prediction models only by this runtime")
    alphas = 1 / (1 + model.sigmas**2)  # the checkpoint's alphas_cumprod, as A1111 holds them
    nets = getattr(pipe.controlnet, "nets", None) or [pipe.controlnet]
    blends = []
    for net, unit in zip(nets, units, strict=True):
        if unit.module != "inpaint_only":
            continue
        rgb, mask = inpaint_parts(unit, width, height)
        pixels = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2 - 1
        origin = encode(pipe.vae, pixels).mean * pipe.vae.config.scaling_factor
        latent_mask = torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None], (10, 10), (8, 8), 1)
        state = {"active": False}

        def note(module: Any, args: Any, kwargs: dict, state: dict = state) -> None:
            state["active"] = float(kwargs.get("conditioning_scale", 1.0)) > 0

        hooks.append(net.register_forward_pre_hook(note, with_kwargs=True))
        blends.append((state, origin, latent_mask, max(0.0, min(1.0, unit.weight))))

    def blend(module: Any, args: Any, kwargs: dict, output: Any) -> Any:
        active = [entry for entry in blends if entry[0]["active"]]
        if not active:
            return output
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        eps = (output[0] if isinstance(output, tuple) else output.sample).float()
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()[0].clamp(0, len(alphas) - 1).cpu()
        low = int(t.floor())
        high = min(low + 1, len(alphas) - 1)
        a = (alphas[low] + (alphas[high] - alphas[low]) * (t - low)).to(eps.device)
        x = sample[:, :4].float()
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        for _, origin, latent_mask, weight in active:
            kept = x0 * latent_mask.to(x.device) + origin.to(x.device, torch.float32) * (1 - latent_mask.to(x.device))
            eps = ((x - a.sqrt() * kept) / (1 - a).sqrt()) * weight + eps * (1 - weight)
        eps = eps.to(sample.dtype)
        if isinstance(output, tuple):
            return (eps, *output[1:])
        output.sample = eps
        return output

    hooks.append(pipe.unet.register_forward_hook(blend, with_kwargs=True))


def inpaint_only_paste(image: Any, units: list[ControlUnit], width: int, height: int) -> Any:
    """The extension's ``inpaint_only`` post-processing of each image: outside the mask (dilated, then blurred,
    by ``INPAINT_BLUR`` px boxes) the unit's image comes back exactly."""
    import cv2
    import numpy as np
    from PIL import Image

    result = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    for unit in units:
        if unit.module != "inpaint_only":
            continue
        rgb, mask = inpaint_parts(unit, width, height)
        mask = cv2.dilate(mask, np.ones((INPAINT_BLUR, INPAINT_BLUR), dtype=np.uint8))
        mask = cv2.blur(mask, (INPAINT_BLUR, INPAINT_BLUR))[:, :, None]
        result = mask * result.clip(0, 1) + (1 - mask) * rgb
    return Image.fromarray((result * 255.0).astype(np.uint8))
