"""Request objects shaped like the ones ESD's client sends: every A1111 v1.8.0 field at its default (or the value
the client puts there) and every always-on extension listed with its arguments, disabled.

Written from the field lists of A1111's API models and the extensions' ``ui()`` argument orders; values are ours.
"""

from __future__ import annotations

import copy
import json
import math

CONTROLNET_UNIT_OFF = {
    "enabled": False,
    "module": "none",
    "model": "None",
    "weight": 1,
    "image": None,
    "resize_mode": "Crop and Resize",
    "low_vram": False,
    "processor_res": -1,
    "threshold_a": -1,
    "threshold_b": -1,
    "guidance_start": 0,
    "guidance_end": 1,
    "pixel_perfect": False,
    "control_mode": "Balanced",
    "save_detected_map": True,
    "is_ui": True,
    "input_mode": "simple",
    "batch_images": "",
    "output_dir": "",
    "loopback": False,
}
TILED_DIFFUSION_OFF = [False, "MultiDiffusion", False, True, 1024, 1024, 96, 96, 48, 4, "None", 2, False, 10, 1, 1]
TILED_DIFFUSION_OFF += [64, False, False, False, False]
TILED_DIFFUSION_OFF += [False, 0.4, 0.4, 0.2, 0.2, "", "", "Background", 0.2, -1.0] * 8
ADETAILER_MODEL = {"ad_model": "face_yolov8n.pt", "ad_prompt": "", "ad_negative_prompt": "", "ad_confidence": 0.3}
ADETAILER_OFF = [False, False, ADETAILER_MODEL, {**ADETAILER_MODEL, "ad_model": "None"}]
ROOP_OFF = [None, False, "0", "/models/roop/inswapper_128.onnx", "CodeFormer", 1, "", 1, 1, False, True]
DYNAMIC_PROMPTS_RANDOM = [True, False, 1, False, False, False, 1.1, 1.5, 100, 0.7, False, False, True, False, False]
DYNAMIC_PROMPTS_RANDOM += [0, "Gustavosta/MagicPrompt-Stable-Diffusion", ""]

ALWAYSON_OFF = {
    "extra options": {"args": []},
    "tiled diffusion": {"args": TILED_DIFFUSION_OFF},
    "tiled vae": {"args": [False, 2048, 128, True, True, True, False]},
    "controlnet": {"args": [CONTROLNET_UNIT_OFF] * 3},
    "refiner": {"args": [False, "", 0.8]},
    "seed": {"args": [223104262, False, -1, 0, 0, 0]},
    # the x/y/z payloads add these three; Dynamic Prompts arrives switched on (random mode)
    "adetailer": {"args": ADETAILER_OFF},
    "roop": {"args": ROOP_OFF},
    "dynamic prompts v2.17.0": {"args": DYNAMIC_PROMPTS_RANDOM},
}

TXT2IMG = {
    "prompt": "aws logo",
    "negative_prompt": "",
    "styles": [],
    "seed": 223104262,
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "DPM++ 2M Karras",
    "batch_size": 1,
    "n_iter": 1,
    "steps": 20,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": None,
    "s_min_uncond": 0.0,
    "s_churn": 0.0,
    "s_tmax": math.inf,
    "s_tmin": 0.0,
    "s_noise": 1.0,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "comments": {},
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2.0,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "sampler_index": "DPM++ 2M Karras",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": ALWAYSON_OFF,
}
IMG2IMG_ONLY = {
    "init_images": [],  # filled by the test
    "resize_mode": 0,
    "image_cfg_scale": 1.5,
    "mask": None,
    "mask_blur_x": 4,
    "mask_blur_y": 4,
    "mask_blur": None,
    "inpainting_fill": 1,
    "inpaint_full_res": False,
    "inpaint_full_res_padding": 32,
    "inpainting_mask_invert": 0,
    "initial_noise_multiplier": 1.0,
    "latent_mask": None,
    "include_init_images": False,
}
HIRES_KEYS = [key for key in TXT2IMG if key.startswith(("enable_hr", "firstphase_", "hr_"))]
IMG2IMG = {
    **{k: v for k, v in TXT2IMG.items() if k not in HIRES_KEYS},
    "prompt": "cat",
    "seed": 690562950,
    "denoising_strength": 0.75,
    **IMG2IMG_ONLY,
}


def payload(base: dict, **changes) -> dict:
    """A deep copy of ``base`` with top-level changes."""
    params = copy.deepcopy(base)
    params.update(changes)
    return params


def as_payload_string(params: dict) -> str:
    """Encoded as Python's json does (``s_tmax`` becomes a bare ``Infinity``), as ESD's client sends it."""
    text = json.dumps(params)
    assert "Infinity" in text
    return text
