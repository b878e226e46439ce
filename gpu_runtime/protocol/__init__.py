"""The wire protocol between the control plane and GPU workers (contract §12.2-12.3).

Both sides import this module and validate with it: the server before it sends a job, the worker before it runs
one, and the server again when events come back. It depends on the standard library only, so the control plane
can import it without the runtime's heavy dependencies, and a worker never needs anything of the server's.
"""

from __future__ import annotations

import json
from typing import Any

# Dramatiq actor names, shared by sender and receiver.
RUN_INFERENCE = "run_inference"
RUN_TRAINING = "run_training"
CANCEL_TRAINING = "cancel_training"
CANCEL_INFERENCE = "cancel_inference"
RUNTIME_EVENT = "runtime_event"

TASKS = ("txt2img", "img2img", "extra-single-image", "extra-batch-images", "rembg")
MODEL_TYPES = (
    "Stable-diffusion",
    "embeddings",
    "Lora",
    "hypernetworks",
    "ControlNet",
    "VAE",
    "ESRGAN",
    "GFPGAN",
    "Codeformer",
    "rembg",
    "ControlNetAnnotator",
)
EVENT_KINDS = ("heartbeat", "inference", "progress", "started", "training")
INVOCATION_STATUSES = ("Completed", "Failed")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which field and why."""


def _require(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProtocolError(f"{where} must be a number")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ProtocolError(f"{where} must be a {names}")
    return value


def _string(value: Any, where: str, *, empty: bool = False) -> str:
    _require(value, str, where)
    if not empty and not value:
        raise ProtocolError(f"{where} must not be empty")
    return value


def model_entry(entry: Any, where: str) -> dict:
    """``{"s3", "id", "model_name", "type"}``: one model a job uses (the server's ``used_models`` entries)."""
    _require(entry, dict, where)
    for field in ("id", "model_name", "type"):
        _string(entry.get(field), f"{where}.{field}")
    _string(entry.get("s3", ""), f"{where}.s3", empty=True)
    return entry


def validate_request(request: Any) -> dict:
    """The inference request of contract §12.3; returns it unchanged when valid."""
    _require(request, dict, "request")
    task = _string(request.get("task"), "request.task")
    if task not in TASKS:
        raise ProtocolError(f"request.task {task!r} is not one of {', '.join(TASKS)}")
    _string(request.get("username", ""), "request.username", empty=True)
    models = _require(request.get("models", {}), dict, "request.models")
    for model_type, entries in models.items():
        if model_type == "space_free_size":
            _require(entries, (int, float), "request.models.space_free_size")
            continue
        if model_type not in MODEL_TYPES:
            raise ProtocolError(f"request.models has an unknown model type {model_type!r}")
        for index, entry in enumerate(_require(entries, list, f"request.models.{model_type}")):
            model_entry(entry, f"request.models.{model_type}.{index}")
    payload = request.get("payload_string")
    if payload is not None:
        _string(payload, "request.payload_string")
        try:
            parsed = json.loads(payload)
        except ValueError:
            raise ProtocolError("request.payload_string must be valid json string") from None
        _require(parsed, dict, "request.payload_string")
    param_s3 = request.get("param_s3")
    urls = request.get("urls")
    if urls is not None:
        _require(urls, dict, "request.urls")
        if urls.get("params") is not None:
            _string(urls["params"], "request.urls.params")
        for key, url in _require(urls.get("models", {}), dict, "request.urls.models").items():
            if key.count("/") != 1:
                raise ProtocolError(f"request.urls.models key {key!r} must be <checkpoint id>/<file>")
            _string(url, f"request.urls.models.{key}")
        _string(urls.get("output"), "request.urls.output")
        if urls.get("cancel") is not None:
            _string(urls["cancel"], "request.urls.cancel")
    if payload is None and not param_s3 and not (urls and urls.get("params")):
        raise ProtocolError("request has neither payload_string nor param_s3 (or urls.params)")
    return request


def validate_event(event: Any) -> dict:
    """One worker -> server event (contract §12.2); returns it unchanged when valid."""
    _require(event, dict, "event")
    kind = _string(event.get("kind"), "event.kind")
    if kind == "heartbeat":
        _string(event.get("endpoint"), "event.endpoint")
        _string(event.get("worker"), "event.worker")
        _string(event.get("instance_type", ""), "event.instance_type", empty=True)
        capabilities = event.get("capabilities")
        if capabilities is not None:
            _require(capabilities, dict, "event.capabilities")
            _string(capabilities.get("digest"), "event.capabilities.digest")
    elif kind == "inference":
        _string(event.get("inferenceId"), "event.inferenceId")
        status = _string(event.get("invocationStatus"), "event.invocationStatus")
        if status not in INVOCATION_STATUSES:
            raise ProtocolError(f"event.invocationStatus must be one of {', '.join(INVOCATION_STATUSES)}")
        _string(event.get("outputLocation") or "", "event.outputLocation", empty=True)
        _string(event.get("failureReason") or "", "event.failureReason", empty=True)
        for timing in ("runSeconds", "gpuSeconds"):  # optional: what the worker measured (the server's metrics)
            if event.get(timing) is not None and _require(event[timing], (int, float), f"event.{timing}") < 0:
                raise ProtocolError(f"event.{timing} must not be negative")
    elif kind == "progress":
        _string(event.get("inferenceId"), "event.inferenceId")
        step, steps = _require(event.get("step"), int, "event.step"), _require(event.get("steps"), int, "event.steps")
        if not 0 <= step <= steps:
            raise ProtocolError("event.step must be between 0 and event.steps")
    elif kind == "started":
        _string(event.get("inferenceId"), "event.inferenceId")
        _string(event.get("worker"), "event.worker")
    elif kind == "training":
        _string(event.get("id"), "event.id")
        _string(event.get("status"), "event.status")
        _string(event.get("reason") or "", "event.reason", empty=True)
        for index, entry in enumerate(_require(event.get("saved", []), list, "event.saved")):
            saved_entry(entry, f"event.saved[{index}]")
        if event.get("attempt") is not None:
            _require(event["attempt"], int, "event.attempt")
    else:
        raise ProtocolError(f"event.kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
    return event


def heartbeat(endpoint: str, worker: str, instance_type: str = "", capabilities: dict | None = None) -> dict:
    """A worker's liveness report; ``capabilities`` (see :func:`capability_summary`) lets the console show what
    the workers behind an endpoint can do."""
    event = {"kind": "heartbeat", "endpoint": endpoint, "worker": worker, "instance_type": instance_type}
    if capabilities is not None:
        event["capabilities"] = capabilities
    return event


def capability_summary(document: dict) -> dict:
    """The short form of a capabilities document a heartbeat carries every 15 s: its digest and what the console
    lists (the full field table is ``python -m gpu_runtime capabilities`` on the worker)."""
    from gpu_runtime.protocol.policy import digest

    keys = ("tasks", "samplers", "families", "scripts", "upscalers", "device", "dtype")
    summary = {key: document[key] for key in keys if key in document}
    summary["alwayson_scripts"] = document.get("alwayson_scripts", {})
    summary["digest"] = digest(document)
    return summary


def inference_result(
    job_id: str,
    *,
    ok: bool,
    output_location: str = "",
    reason: str = "",
    run_seconds: float | None = None,
    gpu_seconds: float | None = None,
) -> dict:
    """A job's end. ``run_seconds`` (pickup to result) and ``gpu_seconds`` (the job's share of the worker's time)
    are durations on the worker's own clock, so the server can split a job's latency without comparing clocks."""
    event: dict[str, Any] = {
        "kind": "inference",
        "inferenceId": job_id,
        "invocationStatus": "Completed" if ok else "Failed",
        "outputLocation": output_location,
        "failureReason": reason,
    }
    if run_seconds is not None:
        event["runSeconds"] = round(run_seconds, 4)
    if gpu_seconds is not None:
        event["gpuSeconds"] = round(gpu_seconds, 4)
    return event


def progress(job_id: str, step: int, steps: int) -> dict:
    return {"kind": "progress", "inferenceId": job_id, "step": step, "steps": steps}


def started(job_id: str, worker: str) -> dict:
    """A worker took a job from its queue and is working on it: from here on the job is running, not queued
    (``queue_position`` of the control plane counts only jobs no worker has reported yet)."""
    return {"kind": "started", "inferenceId": job_id, "worker": worker}


def validate_cancel(args: Any) -> str:
    """The arguments of a ``cancel_inference(job_id)`` message on an endpoint's queue; returns the job id.

    The message is handled at once on the worker's consumer thread, but a queue with many messages ahead of it
    (the consumer's prefetch is limited) delivers it late: the request's ``urls.cancel`` (a GET that answers 200
    once the job is cancelled) is what the worker polls while the job runs, and checks before running it.
    """
    _require(args, (list, tuple), "cancel_inference arguments")
    if len(args) != 1:
        raise ProtocolError("cancel_inference takes exactly one argument, the job id")
    return _string(args[0], "cancel_inference job id")


def training_status(job_id: str, status: str, reason: str = "", **extra: Any) -> dict:
    return {"kind": "training", "id": job_id, "status": status, "reason": reason, **extra}


FM_TYPES = ("sd_1_5", "sd_xl")
INPUTS_FOLDER = "inputs"  # a training's further input files, beside its config file on the worker
MAX_INPUT_PARTS = 5  # inputs/reg/<dataset folder>/<repeats>_<class>/<file>
SAVED_KINDS = ("model", "state", "sample")


def _relative_path(path: Any, where: str, *, max_parts: int) -> str:
    """A storage-relative file path sent to a worker: 1..max_parts plain segments, nothing that escapes a folder."""
    _string(path, where)
    parts = path.split("/")
    if len(parts) > max_parts:
        raise ProtocolError(f"{where} {path!r} has more than {max_parts} path segments")
    for part in parts:
        if not part or part in (".", "..") or "\\" in part or any(ord(c) < 32 for c in part) or len(part) > 255:
            raise ProtocolError(f"{where} {path!r} is not an allowed file path")
    return path


def validate_training_spec(spec: Any) -> dict:
    """The ``run_training(job_id, spec)`` spec of contract §12.2; returns it unchanged when valid.

    ``{"fm_type", "config_key", "model_key", "dataset_prefix", "output_prefix", "attempt" (optional, 1 first),
    "urls": {"config": GET, "model": GET, "dataset": {relative path: GET}, "outputs": {file name: PUT}, "inputs":
    {relative path: GET} (optional), "samples": [PUT, ...] (optional), "cancel": GET (optional)}}``.

    Dataset paths are relative to ``dataset_prefix`` (``name.png`` or ``10_technic/name.png``); output names are
    plain file names. ``inputs`` are further files the config names, relative to the config file's folder under
    ``inputs/`` (a resume state, regularization images, a LoRA to continue from). ``samples`` are upload slots for
    sample images, used in the order the images are made (their names are the trainer's, reported in events).
    ``attempt`` tells a resumed run from the run before it: a worker treats ``(id, attempt)`` as the run.
    """
    _require(spec, dict, "spec")
    fm_type = _string(spec.get("fm_type"), "spec.fm_type")
    if fm_type not in FM_TYPES:
        raise ProtocolError(f"spec.fm_type {fm_type!r} is not one of {', '.join(FM_TYPES)}")
    for field in ("config_key", "model_key", "dataset_prefix", "output_prefix"):
        _string(spec.get(field), f"spec.{field}")
    urls = _require(spec.get("urls"), dict, "spec.urls")
    _string(urls.get("config"), "spec.urls.config")
    _string(urls.get("model"), "spec.urls.model")
    dataset = _require(urls.get("dataset"), dict, "spec.urls.dataset")
    if not dataset:
        raise ProtocolError("spec.urls.dataset must not be empty")
    for path, url in dataset.items():
        _relative_path(path, "spec.urls.dataset key", max_parts=2)
        _string(url, f"spec.urls.dataset.{path}")
    outputs = _require(urls.get("outputs"), dict, "spec.urls.outputs")
    if not outputs:
        raise ProtocolError("spec.urls.outputs must not be empty")
    for name, url in outputs.items():
        _relative_path(name, "spec.urls.outputs key", max_parts=1)
        _string(url, f"spec.urls.outputs.{name}")
    for path, url in _require(urls.get("inputs", {}), dict, "spec.urls.inputs").items():
        _relative_path(path, "spec.urls.inputs key", max_parts=MAX_INPUT_PARTS)
        if not path.startswith(INPUTS_FOLDER + "/"):
            raise ProtocolError(f"spec.urls.inputs key {path!r} must be under {INPUTS_FOLDER}/")
        _string(url, f"spec.urls.inputs.{path}")
    for index, url in enumerate(_require(urls.get("samples", []), list, "spec.urls.samples")):
        _string(url, f"spec.urls.samples[{index}]")
    if urls.get("cancel") is not None:
        _string(urls["cancel"], "spec.urls.cancel")
    attempt = spec.get("attempt", 1)
    if _require(attempt, int, "spec.attempt") < 1:
        raise ProtocolError("spec.attempt must be 1 or more")
    return spec


def training_run(job_id: str, attempt: int) -> str:
    """The id of one run of a training: a resumed job runs again under the same job id, and a worker that saw the
    first run finish (or be cancelled) must still take the second."""
    return job_id if attempt <= 1 else f"{job_id}#{attempt}"


def saved_entry(entry: Any, where: str) -> dict:
    """One file a running training uploaded (``saved`` in a ``training`` event): ``{"name", "kind", "epoch",
    "step"}`` plus ``"slot"`` for a sample image (the index of its upload URL in ``spec.urls.samples``) and
    ``"removed": true`` when the run deleted an older file (``save_last_n_epochs``)."""
    _require(entry, dict, where)
    _relative_path(entry.get("name"), f"{where}.name", max_parts=2)
    kind = _string(entry.get("kind"), f"{where}.kind")
    if kind not in SAVED_KINDS:
        raise ProtocolError(f"{where}.kind must be one of {', '.join(SAVED_KINDS)}")
    for field in ("epoch", "step"):
        if entry.get(field) is not None and _require(entry[field], int, f"{where}.{field}") < 0:
            raise ProtocolError(f"{where}.{field} must not be negative")
    if kind == "sample":
        _require(entry.get("slot"), int, f"{where}.slot")
    return entry
