"""The job and event schemas both sides validate with, and the pure pieces of the engine."""

import json
import re
import subprocess
import sys

import pytest

from gpu_runtime import protocol
from gpu_runtime.errors import JobError
from gpu_runtime.protocol.prompts import extract_loras


def request(**changes):
    base = {
        "task": "txt2img",
        "username": "alice",
        "models": {
            "space_free_size": 4e10,
            "Stable-diffusion": [
                {
                    "s3": "s3://esd/Stable-diffusion/checkpoint/custom/c1",
                    "id": "c1",
                    "model_name": "v1.safetensors",
                    "type": "Stable-diffusion",
                }
            ],
        },
        "payload_string": json.dumps({"prompt": "a cat"}),
        "urls": {"models": {"c1/v1.safetensors": "http://x/get"}, "output": "http://x/put"},
    }
    base.update(changes)
    return base


def test_runtime_imports_no_django():
    code = (
        "import sys, gpu_runtime.protocol, gpu_runtime.worker, gpu_runtime.server, gpu_runtime.protocol.prompts, "
        "gpu_runtime.samplers, gpu_runtime.files; "
        "bad = [m for m in sys.modules if m == 'django' or m.startswith(('django.', 'apps.', 'esd.'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_valid_request_passes():
    assert protocol.validate_request(request()) == request()
    assert protocol.validate_request(
        request(payload_string=None, param_s3="s3://esd/txt2img/infer_v2/j/api_param.json")
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"task": "paint"}, "request.task 'paint' is not one of"),
        ({"models": {"Checkpoints": []}}, "unknown model type 'Checkpoints'"),
        ({"models": {"Lora": [{"id": "x"}]}}, "request.models.Lora.0.model_name must be a str"),
        ({"payload_string": "{not json"}, "payload_string must be valid json string"),
        ({"payload_string": "[1]"}, "request.payload_string must be a dict"),
        ({"payload_string": None}, "neither payload_string nor param_s3"),
        ({"urls": {"models": {"no-slash": "u"}, "output": "o"}}, "must be <checkpoint id>/<file>"),
        ({"urls": {"models": {}}}, "request.urls.output must be a str"),
    ],
)
def test_invalid_requests_say_why(changes, message):
    with pytest.raises(protocol.ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        protocol.validate_request(request(**changes))


def test_event_builders_produce_valid_events():
    for event in (
        protocol.heartbeat("esd-async-x", "host/1", "rtx"),
        protocol.inference_result("j", ok=True, output_location="http://x"),
        protocol.inference_result("j", ok=False, reason="boom"),
        protocol.progress("j", 3, 20),
        protocol.training_status("t", "Training", epoch=1),
    ):
        assert protocol.validate_event(event) is event


@pytest.mark.parametrize(
    "event",
    [
        {"kind": "nope"},
        {"kind": "heartbeat", "endpoint": ""},
        {"kind": "progress", "inferenceId": "j", "step": 5, "steps": 3},
        {"kind": "inference", "inferenceId": "j", "invocationStatus": "Done"},
        [],
    ],
)
def test_invalid_events(event):
    with pytest.raises(protocol.ProtocolError):
        protocol.validate_event(event)


def test_lora_tags_are_extracted():
    assert extract_loras("a cat <lora:style:0.8>, <lora:Other>") == ("a cat", [("style", 0.8), ("Other", 1.0)])
    assert extract_loras("<LORA:x:0.5:0.3> dog") == ("dog", [("x", 0.5)])
    assert extract_loras("no tags") == ("no tags", [])
    with pytest.raises(ValueError, match="not a number"):
        extract_loras("<lora:x:abc>")


def test_samplers_map_and_refuse_unknown_names():
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler, PNDMScheduler

    from gpu_runtime.kdiffusion import KDiffusionScheduler
    from gpu_runtime.samplers import SAMPLERS, scheduler_for

    config = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    # A1111's API default is ``sampler_name or sampler_index`` and sampler_index defaults to "Euler".
    default = scheduler_for(None, config)
    assert isinstance(default, KDiffusionScheduler) and default.loop == "euler"
    karras = scheduler_for("DPM++ 2M Karras", config)
    assert karras.loop == "dpmpp_2m" and karras.schedule_kind == "karras"
    assert isinstance(scheduler_for("PLMS", config), PNDMScheduler)
    for name in SAMPLERS:
        scheduler_for(name, config)  # every advertised sampler can be built here
    with pytest.raises(JobError, match="sampler Foo is not supported"):
        scheduler_for("Foo", config)


def test_make_tiny_model_command(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "tiny.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "gpu_runtime", "make-tiny-model", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    from gpu_runtime.families import family_of_file

    assert out.exists() and family_of_file(out) == "tiny-sd15"


def training_spec(**urls) -> dict:
    return {
        "fm_type": "sd_1_5",
        "config_key": "c",
        "model_key": "m/x.safetensors",
        "dataset_prefix": "dataset/d",
        "output_prefix": "o",
        "urls": {"config": "u", "model": "u", "dataset": {"1_a/x.png": "u"}, "outputs": {"x.safetensors": "u"}, **urls},
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (training_spec(inputs={"reg/1_a/x.png": "u"}), "must be under inputs/"),
        (training_spec(inputs={"inputs/../x": "u"}), "is not an allowed file path"),
        (training_spec(inputs={"inputs/a/b/c/d/e": "u"}), "more than 5 path segments"),
        (training_spec(samples="u"), "spec.urls.samples must be a list"),
        ({**training_spec(), "attempt": 0}, "spec.attempt must be 1 or more"),
    ],
)
def test_training_specs_say_why(spec, message):
    with pytest.raises(protocol.ProtocolError, match=re.escape(message)):
        protocol.validate_training_spec(spec)


def test_training_runs_and_saved_entries():
    spec = {**training_spec(inputs={"inputs/reg/1_a/x.png": "u"}, samples=["u", "u"]), "attempt": 2}
    assert protocol.validate_training_spec(spec) is spec
    assert protocol.training_run("j", 1) == "j" and protocol.training_run("j", 2) == "j#2"
    sample = {"name": "sample/x_e000001_00.png", "kind": "sample", "epoch": 1, "step": 6, "slot": 0}
    assert protocol.saved_entry(sample, "s") is sample
    with pytest.raises(protocol.ProtocolError, match=r"s\.slot must be a int"):
        protocol.saved_entry({**sample, "slot": None}, "s")
    with pytest.raises(protocol.ProtocolError, match=r"s\.kind must be one of model, state, sample"):
        protocol.saved_entry({**sample, "kind": "log"}, "s")
    with pytest.raises(protocol.ProtocolError, match=r"s\.step must not be negative"):
        protocol.saved_entry({**sample, "step": -1}, "s")
    event = protocol.training_status("j", "Training", saved=[sample], attempt=2)
    assert protocol.validate_event(event) is event


def test_cancel_messages_started_events_and_cancel_urls():
    assert protocol.validate_cancel(("job-1",)) == "job-1"
    assert protocol.validate_cancel(["job-1"]) == "job-1"
    for args, message in (
        ((), "exactly one argument"),
        (("a", "b"), "exactly one argument"),
        (("",), "cancel_inference job id must not be empty"),
        ((7,), "cancel_inference job id must be a str"),
        ("job-1", "cancel_inference arguments must be a list or tuple"),
    ):
        with pytest.raises(protocol.ProtocolError, match=re.escape(message)):
            protocol.validate_cancel(args)
    event = protocol.started("job-1", "host/1")
    assert protocol.validate_event(event) is event
    with pytest.raises(protocol.ProtocolError, match=re.escape("event.worker must be a str")):
        protocol.validate_event({"kind": "started", "inferenceId": "job-1"})
    request = {
        "task": "txt2img",
        "payload_string": "{}",
        "urls": {"models": {}, "output": "http://o", "cancel": "http://c"},
    }
    assert protocol.validate_request(request) is request
    with pytest.raises(protocol.ProtocolError, match=re.escape("request.urls.cancel must be a str")):
        protocol.validate_request({**request, "urls": {**request["urls"], "cancel": 5}})
