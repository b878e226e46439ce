"""The parameter policy: whole A1111-shaped requests run, and every field or script the runtime does not implement
is refused by name before any GPU work (issue 11: no request succeeds while ignoring what it asked for)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

from gpu_runtime.errors import JobError
from gpu_runtime.protocol import policy
from tests.gpu_runtime.a1111_payloads import (
    ALWAYSON_OFF,
    CONTROLNET_UNIT_OFF,
    IMG2IMG,
    TXT2IMG,
    as_payload_string,
    payload,
)
from tests.gpu_runtime.conftest import make_request, png_size

SMALL = {"width": 64, "height": 64, "steps": 3}  # the tiny model on a CPU; every other field as the client sends it


def prepare(engine, files, params, task="txt2img", job_id="j"):
    request = make_request(files, job_id, {}, task=task)
    request["payload_string"] = json.dumps(params)
    return engine.prepare(job_id, request)


def test_full_a1111_txt2img_request_with_disabled_scripts_and_infinity_gets_an_image(engine, files):
    params = payload(TXT2IMG, **SMALL, unknown_client_field=1)
    request = make_request(files, "full", {})
    request["payload_string"] = as_payload_string(params)  # bare Infinity for s_tmax, as ESD's client sends it
    output = engine.run([engine.prepare("full", request)])[0]
    assert [png_size(image) for image in output["images"]] == [(64, 64)]
    info = json.loads(output["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["all_seeds"] == [223104262]
    assert info["ignored_parameters"] == ["unknown_client_field"]
    assert info["all_prompts"] == ["aws logo"]  # Dynamic Prompts is on, but the prompt has none of its syntax


def test_full_a1111_img2img_request_gets_an_image(engine, files):
    source = engine.run([prepare(engine, files, {"prompt": "cat", "seed": 1, **SMALL})])[0]["images"][0]
    params = payload(IMG2IMG, **SMALL, init_images=[source])
    request = make_request(files, "full-i2i", {}, task="img2img")
    request["payload_string"] = as_payload_string(params)
    output = engine.run([engine.prepare("full-i2i", request)])[0]
    assert [png_size(image) for image in output["images"]] == [(64, 64)]
    assert json.loads(output["info"])["ignored_parameters"] == []


def _on(script, args):
    return {**ALWAYSON_OFF, script: {"args": args}}


REFUSED_TXT2IMG = [
    ({"script_name": "Prompts from file or textbox", "script_args": []}, "script Prompts from file or textbox is not"),
    (
        {"alwayson_scripts": _on("dynamic prompts v2.17.0", [True, False, 1, True])},
        "always-on script dynamic prompts v2.17.0: magic prompt is not supported",
    ),
    ({"enable_hr": True, "denoising_strength": 0.5, "firstphase_width": 256}, "firstphase_width=256 is not supported"),
    ({"enable_hr": True, "denoising_strength": 0.5, "hr_scheduler": "Beta"}, 'hr_scheduler="Beta" is not'),
    ({"styles": ["cinematic"]}, 'styles=["cinematic"] is not supported'),
    ({"scheduler": "Align Your Steps"}, 'scheduler="Align Your Steps" is not supported by this runtime; use one'),
    ({"scheduler": "Karras", "sampler_name": "DDIM"}, 'scheduler="Karras" is not supported with sampler DDIM'),
    ({"sampler_name": "DPM adaptive"}, "sampler DPM adaptive is not supported; use one of: DPM++ 2M Karras,"),
    ({"override_settings": {"face_restoration_model": "RestoreFormer"}}, 'face_restoration_model="RestoreFormer"'),
    ({"override_settings": {"code_former_weight": 2}}, "override_settings.code_former_weight=2 is not supported"),
    ({"s_min_uncond": 0.5}, "s_min_uncond=0.5 is not supported"),
    ({"firstpass_image": "aGVsbG8="}, "firstpass_image="),
    ({"infotext": "a cat\nSteps: 20"}, "infotext="),
    ({"override_settings": {"emphasis": "No norm"}}, 'override_settings.emphasis="No norm"'),
    ({"override_settings": {"randn_source": "NV"}}, 'override_settings.randn_source="NV"'),
    ({"override_settings": {"k_sched_type": "beta"}}, 'override_settings.k_sched_type="beta"'),
    ({"alwayson_scripts": _on("tiled diffusion", [True, "MultiDiffusion"])}, "always-on script tiled diffusion"),
    ({"alwayson_scripts": _on("tiled vae", [True, 2048, 128])}, "always-on script tiled vae is enabled"),
    ({"alwayson_scripts": _on("adetailer", [True, False, {"ad_model": "face_yolov8n.pt"}])}, "script adetailer"),
    ({"alwayson_scripts": _on("roop", [None, True, "0"])}, "always-on script roop is enabled"),
    (
        {"alwayson_scripts": _on("controlnet", [{**CONTROLNET_UNIT_OFF, "enabled": True, "control_mode": 3}])},
        "ControlNet unit 0: control_mode=3 is not one of: Balanced, My prompt is more important, ControlNet is more",
    ),
    # A ControlNet unit without "enabled" is on (sd-webui-controlnet's get_enabled_units).
    (
        {"alwayson_scripts": _on("controlnet", [{"module": "openpose", "model": "cn"}])},
        'ControlNet unit 0: module "openpose" is not supported by this runtime; use one of: blur_gaussian, canny,',
    ),
    (
        {"alwayson_scripts": _on("controlnet", [{"model": "cn"}]), "enable_hr": True, "denoising_strength": 0.5},
        "ControlNet with hires fix is not supported",
    ),
    ({"alwayson_scripts": _on("soft inpainting", [True, 1, 0.5])}, "always-on script soft inpainting"),
    ({"alwayson_scripts": {"regional prompter": {"args": [True]}}}, "always-on script regional prompter is not"),
]
REFUSED_IMG2IMG = [
    ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta=31337"),
    ({"subseed_strength": 0.5}, "subseed_strength=0.5 is not supported"),  # img2img's noise is drawn by diffusers
    ({"seed_resize_from_w": 256, "seed_resize_from_h": 256}, "seed_resize_from_"),
    ({"latent_mask": "aGVsbG8="}, "latent_mask="),
]


@pytest.mark.parametrize(("changes", "message"), REFUSED_TXT2IMG, ids=lambda v: str(v)[:40])
def test_unsupported_txt2img_field_or_script_is_refused_by_name(engine, files, changes, message):
    with pytest.raises(JobError, match=_literal(message)):
        prepare(engine, files, payload(TXT2IMG, **SMALL, **changes))
    assert not list((engine.root / "models").glob("*/*")), "a refused job downloads nothing"


@pytest.mark.parametrize(("changes", "message"), REFUSED_IMG2IMG, ids=lambda v: str(v)[:40])
def test_unsupported_img2img_field_is_refused_by_name(engine, files, changes, message):
    with pytest.raises(JobError, match=_literal(message)):
        prepare(engine, files, payload(IMG2IMG, **SMALL, init_images=["aGVsbG8="], **changes), task="img2img")


@pytest.mark.parametrize(
    ("task", "changes", "message"),
    [
        ("extra-single-image", {"gfpgan_visibility": 1.5}, "gfpgan_visibility must be between 0 and 1"),
        ("extra-batch-images", {"codeformer_visibility": 0.2, "codeformer_weight": -1}, "codeformer_weight must be"),
        ("rembg", {"model": "u2net_cloth_seg"}, "rembg model u2net_cloth_seg is not supported by this runtime"),
    ],
)
def test_unsupported_extras_fields_are_refused_by_name(engine, files, task, changes, message):
    with pytest.raises(JobError, match=_literal(message)):
        prepare(engine, files, {"image": "aGVsbG8=", **changes}, task=task)


def test_inert_values_are_accepted():
    """Hires fields while enable_hr is off, inpainting fields without a mask, disabled scripts, an empty args-less
    entry, the refiner and seed scripts (the API never runs them) and A1111's defaults of unsupported options."""
    policy.check("txt2img", payload(TXT2IMG, hr_scale=4, hr_upscaler="ESRGAN_4x", hr_second_pass_steps=9))
    policy.check("img2img", payload(IMG2IMG, inpainting_fill=3, mask_blur=9, inpaint_full_res_padding=64))
    policy.check("txt2img", {"alwayson_scripts": {"refiner": {"args": [True, "xl_refiner", 0.5]}, "foo": {}}})
    policy.check("txt2img", {"override_settings": {"emphasis": "Original", "s_tmax": 0.0, "eta_noise_seed_delta": 0}})
    policy.check(
        "txt2img", {"s_churn": 0, "s_tmax": float("inf"), "s_tmin": 5.0, "eta": 1.0, "sampler_name": "Euler a"}
    )


def test_eta_is_honoured_by_ddim(engine, files):
    from tests.gpu_runtime.conftest import pixels

    base = {"prompt": "a cat", "seed": 3, "sampler_name": "DDIM", **SMALL}
    zero = engine.run([prepare(engine, files, {**base, "eta": 0.0})])[0]["images"][0]
    noisy = engine.run([prepare(engine, files, {**base, "eta": 1.0})])[0]["images"][0]
    default = engine.run([prepare(engine, files, base)])[0]["images"][0]
    assert (pixels(zero) == pixels(default)).all()  # A1111's eta_ddim default is 0
    assert (pixels(noisy) != pixels(zero)).any()


def test_unknown_override_settings_are_listed_as_ignored(engine, files):
    params = {"prompt": "cat", "seed": 1, **SMALL, "override_settings": {"show_progressbar": False}, "foo": 1}
    output = engine.run([prepare(engine, files, params)])[0]
    assert json.loads(output["info"])["ignored_parameters"] == ["foo", "override_settings.show_progressbar"]


def test_disable_extra_networks_skips_lora_tags(engine, files):
    from tests.gpu_runtime.conftest import pixels

    base = {"prompt": "a cat", "seed": 3, **SMALL}
    plain = engine.run([prepare(engine, files, base)])[0]["images"][0]
    tagged = {**base, "prompt": "a cat <lora:style:1>", "disable_extra_networks": True}
    output = engine.run([prepare(engine, files, tagged)])[0]
    assert (pixels(output["images"][0]) == pixels(plain)).all()
    assert json.loads(output["info"])["loras"] == []


def test_nan_in_payload_is_refused_but_infinity_is_read(engine, files):
    request = make_request(files, "nan", {})
    request["payload_string"] = '{"prompt": "cat", "cfg_scale": NaN}'
    with pytest.raises(JobError, match="NaN is not a valid parameter value"):
        engine.prepare("nan", request)


def test_capabilities_command_prints_the_policy():
    result = subprocess.run(
        [sys.executable, "-m", "gpu_runtime", "capabilities"], capture_output=True, text=True, check=True
    )
    document = json.loads(result.stdout)
    assert document["samplers"] == list(policy.SAMPLER_NAMES) and "txt2img" in document["tasks"]
    assert "latent_mask" in document["fields"]["img2img"]["not supported"]
    assert "mask" in document["fields"]["img2img"]["honoured"]
    assert "enable_hr" in document["fields"]["txt2img"]["honoured"]
    assert "prompt" in document["fields"]["txt2img"]["honoured"]
    assert "controlnet" in document["alwayson_scripts"]["honoured"]
    assert document["alwayson_scripts"]["controlnet_modules"] == [
        "blur_gaussian",
        "canny",
        "hed",
        "hed_safe",
        "inpaint",
        "inpaint_only",
        "invert",
        "lineart",
        "lineart_coarse",
        "lineart_standard",
        "none",
        "scribble_hed",
        "scribble_xdog",
        "shuffle",
        "threshold",
        "tile_resample",
    ]
    assert document["digest"] == policy.digest(policy.capabilities())


def test_every_a1111_field_is_classified():
    """Each field of A1111's request models has a rule (an unknown field would be ignored and listed instead)."""
    for task, params in (("txt2img", TXT2IMG), ("img2img", IMG2IMG)):
        assert policy.check(task, params).ignored == [], task
    for name in ("force_task_id", "do_not_save_samples", "override_settings_restore_afterwards", "comments"):
        assert policy.FIELDS["txt2img"][name].status == policy.INERT


def _literal(text: str) -> str:
    import re

    return re.escape(text)
