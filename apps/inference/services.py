"""Inference job operations (contract §9.7, §10.3, §12): create, start, dispatch, ingest, fail, cancel, progress,
delete.

Every way a result can arrive (a worker's event, a real-time invocation, an async output found by the sweeper or
announced by a notification) ends in ``ingest_output``, which is idempotent: the first result wins, later ones
and results for deleted jobs are dropped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from apps.accounts import webhooks
from apps.accounts.models import User, permissions_of
from apps.endpoints import services as endpoint_services
from apps.endpoints.choices import USABLE, EndpointStatus
from apps.endpoints.models import Endpoint
from apps.endpoints.usage import check_quota
from apps.inference.choices import DIFFUSION_TASKS, EXTRA_TASKS, TERMINAL, InferenceStatus
from apps.inference.models import InferenceJob
from apps.models_registry.choices import STEM_NAMED_TYPES, STEM_SUFFIXES, CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile
from esd import keys
from esd.api.errors import BadRequest
from esd.progress import with_eta
from esd.storage import blob_store
from gpu_runtime.protocol.scripts import FACE_HELPER_FILES, FACE_RESTORERS

log = logging.getLogger(__name__)
FACE_RESTORER_PATTERNS = set(FACE_RESTORERS.values())

BUILTIN_VAES = ("None", "Automatic")


# --- create --------------------------------------------------------------------------------------------------------


def resolve_endpoint(user: User, permissions: frozenset[str], name: str | None, inference_type: str) -> Endpoint:
    """Contract §9.7 step 2: the named endpoint, or a uniform random pick among the usable ones of the type."""
    usable = Endpoint.objects.live()
    if "sagemaker_endpoint:all" not in permissions:
        usable = usable & Endpoint.objects.usable_by(user)
    if name:
        endpoint = usable.filter(name=name).first()
        if endpoint is None:
            raise BadRequest(f"sagemaker endpoint {name} not found")
        if endpoint.status not in USABLE:
            raise BadRequest(f"sagemaker endpoint is not ready with status: {endpoint.status}")
        if endpoint.endpoint_type != inference_type:
            raise BadRequest(f"sagemaker endpoint {name} is {endpoint.endpoint_type}, not {inference_type}")
        return endpoint
    candidates = list(usable.filter(endpoint_type=inference_type, status__in=USABLE))
    if not candidates:
        raise BadRequest(f'no available {inference_type} endpoints for user "{user.username}"')
    return random.choice(candidates)


def resolve_models(user: User, permissions: frozenset[str], models: dict[str, Any]) -> dict[str, list[dict]]:
    """Contract §9.7 step 3: each name an Active checkpoint of exactly that type visible to the caller."""
    visible = Checkpoint.objects.visible_to(user, permissions).filter(status=CheckpointStatus.ACTIVE)
    used: dict[str, list[dict]] = {}
    missing: list[str] = []
    wanted = [(model_type, name) for model_type, names in models.items() for name in (names or [])]
    names = [name for _, name in wanted if isinstance(name, str)]
    stems = [(t, name) for t, name in wanted if t in STEM_NAMED_TYPES and isinstance(name, str)]
    candidates = names + [stem + suffix for t, stem in stems for suffix in STEM_SUFFIXES[t]]
    files: dict[tuple[str, str], tuple[Checkpoint, str]] = {}
    found_files = CheckpointFile.objects.select_related("checkpoint").filter(
        name__in=candidates, checkpoint__in=visible
    )
    for f in found_files.order_by("-checkpoint__created", "name"):  # newest first: the first match of a name wins
        files.setdefault((f.checkpoint.checkpoint_type, f.name), (f.checkpoint, f.name))
        kind = f.checkpoint.checkpoint_type
        if kind in STEM_NAMED_TYPES and f.name.lower().endswith(STEM_SUFFIXES[kind]):
            files.setdefault((kind, f.name.rsplit(".", 1)[0]), (f.checkpoint, f.name))
    store = blob_store()
    for model_type, name in wanted:
        if model_type == "VAE" and name in BUILTIN_VAES:
            used.setdefault("VAE", []).append({"s3": "None", "id": "VAE", "model_name": name, "type": "VAE"})
            continue
        # a face restorer's file is found A1111's way, by the pattern of its model folder
        if isinstance(name, str) and (model_type, name) in FACE_RESTORER_PATTERNS:
            found = _newest_matching(visible, model_type, name)
            if found is None:
                missing.append(f"checkpoint with a file matching {name}, type {model_type} is not found")
                continue
        else:
            found = files.get((model_type, name)) if isinstance(name, str) else None
        if found is None:
            missing.append(f"checkpoint with name {name}, type {model_type} is not found")
            continue
        checkpoint, file_name = found
        used.setdefault(model_type, []).append(
            {"s3": store.uri(checkpoint.prefix), "id": str(checkpoint.id), "model_name": file_name, "type": model_type}
        )
    if missing:
        raise BadRequest(" ".join(missing))
    return used


def _newest_matching(visible: Any, model_type: str, pattern: str) -> tuple[Checkpoint, str] | None:
    """The newest visible file of ``model_type`` matching ``pattern`` (A1111 takes a restorer from its model folder
    by such a pattern), never one of facexlib's helper files that share the GFPGAN folder."""
    from fnmatch import fnmatchcase

    files = CheckpointFile.objects.select_related("checkpoint").filter(
        checkpoint__in=visible, checkpoint__checkpoint_type=model_type, name__endswith=pattern.rsplit("*", 1)[1]
    )
    for f in files.order_by("-checkpoint__created", "name").iterator(chunk_size=50):
        if fnmatchcase(f.name, pattern) and f.name not in FACE_HELPER_FILES:
            return f.checkpoint, f.name
    return None


def create_job(
    *,
    user: User,
    permissions: frozenset[str],
    task_type: str,
    inference_type: str,
    models: dict[str, Any],
    endpoint_name: str | None,
    payload_string: str | None,
) -> InferenceJob:
    if task_type not in DIFFUSION_TASKS and task_type not in EXTRA_TASKS:
        raise BadRequest(f"task type {task_type} should be in {list(EXTRA_TASKS)!r} or {list(DIFFUSION_TASKS)!r}")
    endpoint = resolve_endpoint(user, permissions, endpoint_name, inference_type)
    used = resolve_models(user, permissions, models) if task_type in DIFFUSION_TASKS else {}
    with transaction.atomic():
        check_quota(user)  # the role quota (apps.endpoints.usage); it locks the user until the job exists
        return InferenceJob.objects.create(
            task_type=task_type,
            inference_type=inference_type,
            owner=user.username,
            endpoint=endpoint,
            endpoint_id_copy=str(endpoint.id),
            endpoint_name=endpoint.name,
            instance_type=endpoint.instance_type,
            backend=endpoint.backend,
            payload_string=payload_string,
            used_models=used,
        )


def params_key(job: InferenceJob) -> str:
    return keys.inference_params(job.task_type, str(job.id))


def upload_url(job: InferenceJob) -> str:
    return blob_store().presign_put(params_key(job), settings.ESD_PRESIGN_EXPIRES)


# --- start and dispatch ----------------------------------------------------------------------------------------------


def read_params(job: InferenceJob) -> dict[str, Any]:
    """The job's A1111 parameters: its ``payload_string``, else the ``api_param.json`` a client uploaded."""
    raw: str | bytes | None = job.payload_string
    if raw is None:
        try:
            raw = blob_store().read_bytes(params_key(job))
        except (FileNotFoundError, OSError):
            return {}
    try:
        params = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return params if isinstance(params, dict) else {}


def add_named_models(job: InferenceJob) -> None:
    """Models the parameters name besides ``models`` - the refiner checkpoint, and what an x/y/z plot's axes name
    (checkpoints, VAEs, refiners) - join the job's models, resolved as the job's owner would see them, so the
    worker gets their files; a name the owner cannot see is refused."""
    from gpu_runtime.protocol.scripts import named_models

    have = {(t, e["model_name"]) for t, entries in job.used_models.items() for e in entries}
    wanted = {
        model_type: [name for name in names if (model_type, name) not in have]
        for model_type, names in named_models(job.task_type, read_params(job)).items()
    }
    wanted = {t: names for t, names in wanted.items() if names}
    if not wanted:
        return
    owner = User.objects.filter(username=job.owner).first()
    if owner is None:
        raise BadRequest(f"user {job.owner} of inference job {job.id} no longer exists")
    for model_type, entries in resolve_models(owner, permissions_of(owner), wanted).items():
        job.used_models.setdefault(model_type, []).extend(entries)


@dataclass(frozen=True)
class Started:
    job: InferenceJob
    realtime: bool


def start_job(job_id: str) -> Started:
    """Contract §9.7 start: the guards in order, then ``inprogress`` and the request to the backend."""
    with transaction.atomic():
        job = InferenceJob.objects.select_for_update(of=("self",)).select_related("endpoint").get(pk=job_id)
        if job.status != InferenceStatus.CREATED:
            raise BadRequest(f"inference job {job.id} has already been started")
        if job.payload_string is None and not blob_store().exists(params_key(job)):
            raise BadRequest(f"api params of inference job {job.id} are not uploaded")
        endpoint = job.endpoint
        status = endpoint.status if endpoint is not None else EndpointStatus.DELETED
        if status not in USABLE:
            raise BadRequest(f"sagemaker endpoint is not ready with status: {status}")
        add_named_models(job)
        job.status = InferenceStatus.IN_PROGRESS
        job.start_time = timezone.now()
        if endpoint.backend == "self-hosted":
            job.output_location = blob_store().uri(keys.raw_output(str(job.id)))
        job.save(update_fields=["status", "start_time", "output_location", "used_models"])
        realtime = endpoint.endpoint_type == "Real-time"
        if endpoint.backend == "self-hosted":
            request = build_request(job, self_hosted=True)
            transaction.on_commit(lambda: send_to_worker(endpoint.queue_name, str(job.id), request))
            # With no live worker (an endpoint scaled to zero) the job waits: start the cold-start clock.
            endpoint_services.note_queued(endpoint)
        elif realtime:
            from esd.tasks import enqueue

            enqueue("apps.inference.tasks.invoke_realtime", str(job.id))
    if endpoint.backend == "sagemaker" and not realtime:
        _invoke_async(job, endpoint)
    return Started(job, realtime)


def build_request(job: InferenceJob, *, self_hosted: bool) -> dict:
    """The runtime request of contract §12.3 (validated with the runtime's own protocol module)."""
    from gpu_runtime import protocol

    store = blob_store()
    request: dict[str, Any] = {
        "task": job.task_type,
        "username": job.owner,
        "models": {"space_free_size": 4e10, **job.used_models},
        "param_s3": store.uri(params_key(job)),
        "payload_string": job.payload_string,
    }
    if self_hosted:
        # Queued work may wait: the URLs live as long as the job may.
        expires = max(settings.ESD_PRESIGN_EXPIRES, settings.ESD_ASYNC_TIMEOUT)
        models = {}
        for entries in job.used_models.values():
            for entry in entries:
                key = store.key_of(entry["s3"]) if entry["s3"] != "None" else None
                if key is not None:
                    models[f"{entry['id']}/{entry['model_name']}"] = store.presign_get(
                        f"{key}/{entry['model_name']}", expires
                    )
        request["urls"] = {
            "params": None if job.payload_string is not None else store.presign_get(params_key(job), expires),
            "models": models,
            "output": store.presign_put(keys.raw_output(str(job.id)), expires),
            "cancel": store.presign_get(cancel_marker(job), expires),
        }
    if request["payload_string"] is None:
        del request["payload_string"]
    return protocol.validate_request(request)


def send_to_worker(queue_name: str, job_id: str, request: dict) -> None:
    """The job message on the endpoint's queue, consumed by ``gpu_runtime`` workers (contract §12.2)."""
    import dramatiq

    from gpu_runtime import protocol

    broker = dramatiq.get_broker()
    broker.declare_queue(queue_name)
    broker.enqueue(
        dramatiq.Message(
            queue_name=queue_name, actor_name=protocol.RUN_INFERENCE, args=(job_id, request), kwargs={}, options={}
        )
    )


def _invoke_async(job: InferenceJob, endpoint: Endpoint) -> None:
    """SageMaker async: the request goes to S3, the invocation names it; both output locations are kept."""
    from botocore.exceptions import ClientError

    from esd.aws import client

    store = blob_store()
    input_key = keys.async_input(endpoint.name, str(job.id))
    store.put_bytes(input_key, json.dumps(build_request(job, self_hosted=False)).encode())
    try:
        answer = client("sagemaker-runtime").invoke_endpoint_async(
            EndpointName=endpoint.name,
            InputLocation=store.uri(input_key),
            InferenceId=str(job.id),
            ContentType="application/json",
            InvocationTimeoutSeconds=3600,
        )
    except ClientError as exc:
        fail_job(str(job.id), {"error": str(exc)})
        raise BadRequest(str(exc)) from exc
    InferenceJob.objects.filter(pk=job.pk).update(
        output_location=answer.get("OutputLocation"), failure_location=answer.get("FailureLocation")
    )
    job.output_location = answer.get("OutputLocation")
    job.failure_location = answer.get("FailureLocation")


# --- results ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """When a job's result reached the server (its clock) and what the runtime measured on its own clock.

    The terminal transitions turn this into the job's queue / run / ingest / GPU seconds (``/metrics``): queue is
    what remains of start-to-arrival once the run is taken out, so no two machines' clocks are ever compared.
    """

    received: datetime
    run_seconds: float | None = None
    gpu_seconds: float | None = None


def _timing_fields(job: InferenceJob, arrival: Arrival | None, runtime_seconds: float | None = None) -> dict:
    """The duration fields a terminal transition writes (unknown parts stay null rather than being guessed)."""
    now = timezone.now()
    arrival = arrival or Arrival(received=now)
    run = arrival.run_seconds
    queue = None
    if run is not None and job.start_time is not None:
        queue = max(0.0, (arrival.received - job.start_time).total_seconds() - run)
    gpu = arrival.gpu_seconds if arrival.gpu_seconds is not None else runtime_seconds
    return {
        "queue_seconds": queue,
        "run_seconds": run,
        "ingest_seconds": max(0.0, (now - arrival.received).total_seconds()),
        "gpu_seconds": gpu,
    }


def ingest_output(job_id: str, raw: bytes | None, arrival: Arrival | None = None) -> InferenceJob | None:
    """Record a runtime's raw output (contract §12.3): images and the param file to storage, then ``succeed``;
    an error report or anything unreadable makes the job ``failed``. Safe to call any number of times."""
    arrival = arrival or Arrival(received=timezone.now())
    job = InferenceJob.objects.filter(pk=job_id).first()
    if job is None or job.status in TERMINAL:
        if job is not None and was_cancelled(job):
            _discard_late_output(job)
            _account_cancelled(job_id, arrival)
        return job  # deleted meanwhile, or already recorded
    try:
        output = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        output = None
    if not isinstance(output, dict):
        return fail_job(
            job_id,
            {"error": "the runtime's output is not readable", "output": (raw or b"")[:1000].decode("utf-8", "replace")},
            arrival,
        )
    if "error" in output:
        return fail_job(job_id, output, arrival)
    images = output.get("images")
    if images is None and "image" in output:
        images = [output["image"]]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return fail_job(job_id, {"error": "the runtime's output has no images", "output_keys": sorted(output)}, arrival)
    store = blob_store()
    names = []
    try:
        for index, data in enumerate(images):
            store.put_bytes(keys.result_image(job_id, index), base64.b64decode(data, validate=True))
            names.append(f"image_{index}.png")
    except (binascii.Error, ValueError):
        return fail_job(job_id, {"error": "the runtime's output has an image that is not base64"}, arrival)
    info = output.get("info")
    store.put_bytes(
        keys.result_params(job_id),
        json.dumps(
            {
                "parameters": output.get("parameters"),
                "info": info,
                "html_info": output.get("html_info"),
                "endpoint_name": job.endpoint_name,
                "inference_id": job_id,
            }
        ).encode(),
    )
    runtime_seconds = _runtime_seconds(info)
    with transaction.atomic():
        updated = InferenceJob.objects.filter(pk=job_id, status=InferenceStatus.IN_PROGRESS).update(
            status=InferenceStatus.SUCCEED,
            complete_time=timezone.now(),
            image_names=names,
            inference_info_name=f"{job_id}_param.json",
            runtime_seconds=runtime_seconds,
            progress_step=F("progress_steps"),
            **_timing_fields(job, arrival, runtime_seconds),
        )
        if updated:
            ended(job_id, job.owner)
    job = InferenceJob.objects.filter(pk=job_id).first()
    if not updated:
        log.info("result for job %s arrived after it ended; dropped", job_id)
        if job is not None and was_cancelled(job):
            _discard_late_output(job)
            _account_cancelled(job_id, arrival)
    return job


def was_cancelled(job: InferenceJob) -> bool:
    """Whether the job ended by ``cancel_job`` (its recorded reason is the one place that says so)."""
    raw = job.sagemaker_raw
    return (
        job.status == InferenceStatus.FAILED
        and isinstance(raw, dict)
        and isinstance(raw.get("error"), str)
        and raw["error"].startswith("cancelled by ")
    )


def _discard_late_output(job: InferenceJob) -> None:
    """A cancelled job has no result: what its runtime still delivered (a worker that finished before it saw the
    cancel, a SageMaker job that ran on) is removed, as are images an ingestion racing the cancel had stored."""
    job_id = str(job.id)
    store = blob_store()
    store.delete(keys.raw_output(job_id))
    if job.output_location and (key := store.key_of(job.output_location)):
        store.delete(key)
    store.delete_folder(keys.result_prefix(job_id))


def fail_job(job_id: str, report: Any, arrival: Arrival | None = None) -> InferenceJob | None:
    """``failed`` with the runtime's report in ``sagemakerRaw`` (only from ``inprogress``; created jobs fail
    too when their dispatch is refused). ``arrival``: a runtime reported the failure (its time is recorded)."""
    if not _fail(job_id, report, arrival) and arrival is not None:
        _account_cancelled(job_id, arrival)
    return InferenceJob.objects.filter(pk=job_id).first()


def _account_cancelled(job_id: str, arrival: Arrival) -> None:
    """A cancelled job ended before its worker stopped it: the worker time it used until then (the worker's last
    event) is still recorded, once, for accounting and quotas. Other fields of the ended job stay as they were."""
    job = InferenceJob.objects.filter(pk=job_id).first()
    if arrival.gpu_seconds is None or job is None or job.gpu_seconds is not None or not was_cancelled(job):
        return
    InferenceJob.objects.filter(pk=job_id, gpu_seconds=None).update(
        gpu_seconds=arrival.gpu_seconds, run_seconds=arrival.run_seconds
    )


def ended(job_id: str, owner: str) -> None:
    """Every change to a final status calls this once, in the transaction that makes it: the owner's webhooks
    (``apps.accounts.webhooks``) are notified after the commit."""
    webhooks.job_ended("inference", str(job_id), owner)


def _fail(job_id: str, report: Any, arrival: Arrival | None = None) -> bool:
    """The one transition to ``failed``; False when the job had already ended (the first outcome wins)."""
    with transaction.atomic():
        pending = InferenceJob.objects.filter(
            pk=job_id, status__in=(InferenceStatus.CREATED, InferenceStatus.IN_PROGRESS)
        )
        timings: dict[str, Any] = {}
        if arrival is not None and (started := pending.only("start_time").first()) is not None:
            timings = _timing_fields(started, arrival)
        updated = pending.update(
            status=InferenceStatus.FAILED, complete_time=timezone.now(), sagemaker_raw=report, **timings
        )
        if updated:
            ended(job_id, InferenceJob.objects.filter(pk=job_id).values_list("owner", flat=True).first() or "")
    return bool(updated)


# --- cancel ----------------------------------------------------------------------------------------------------------


def cancel_marker(job: InferenceJob) -> str:
    return keys.inference_cancel_marker(job.task_type, str(job.id))


def cancel_job(job: InferenceJob, username: str) -> InferenceJob:
    """Stop a job that has not ended: it is ``failed`` with ``cancelled by {username}`` at once, whatever runs it.

    A self-hosted job is also stopped on its worker: a cancel marker in storage (which the worker looks at before
    running the job and polls while it runs) and a ``cancel_inference`` message on the endpoint's queue (seen at
    once unless other messages are queued ahead of it). A queued job is therefore skipped when its message reaches
    a worker, a running one stops between two denoising steps. A SageMaker job runs on; its result is not ingested
    (``ingest_output`` drops results of ended jobs, and the sweeper looks only at jobs in progress).
    """
    if job.status in TERMINAL:
        raise BadRequest(f"inference job {job.id} has already ended with status {job.status}")
    reason = f"cancelled by {username}"
    with transaction.atomic():
        before = InferenceJob.objects.select_for_update().filter(pk=job.pk).values_list("status", flat=True).first()
        if before not in TERMINAL and before is not None and job.backend != "sagemaker":
            # before the job ends, whatever its status: a job being started right now is skipped by the worker that
            # takes it, which looks at the marker first; and under the row's lock: a worker that sees the marker
            # and reports its stop at once waits for this cancel to be recorded, rather than ending the job first
            try:
                blob_store().put_bytes(cancel_marker(job), reason.encode())
            except Exception:
                log.warning("could not write the cancel marker of inference %s", job.id, exc_info=True)
        if before in TERMINAL or before is None or not _fail(str(job.id), {"error": reason}):
            job.refresh_from_db()
            raise BadRequest(f"inference job {job.id} has already ended with status {job.status}")
    job.refresh_from_db()
    if before == InferenceStatus.IN_PROGRESS and job.backend == "self-hosted":
        _stop_on_worker(job)
    return job


def _stop_on_worker(job: InferenceJob) -> None:
    """The message, for the worker running the job now (the marker is written before the job ends). The job has
    already ended here, so trouble is logged, not raised: the marker still stops it, and at worst the worker runs
    the job to its end and the result is dropped, as for any late result."""
    try:
        endpoint = Endpoint.objects.filter(pk=job.endpoint_id).first() if job.endpoint_id else None
        if endpoint is not None:
            send_cancel(endpoint.queue_name, str(job.id))
    except Exception:
        log.warning("could not send the cancel message of inference %s", job.id, exc_info=True)


def send_cancel(queue_name: str, job_id: str) -> None:
    """``cancel_inference(job_id)`` on the endpoint's queue, which every worker of the endpoint consumes."""
    import dramatiq

    from gpu_runtime import protocol

    args = (job_id,)
    protocol.validate_cancel(args)
    broker = dramatiq.get_broker()
    broker.declare_queue(queue_name)
    broker.enqueue(
        dramatiq.Message(queue_name=queue_name, actor_name=protocol.CANCEL_INFERENCE, args=args, kwargs={}, options={})
    )


# --- progress --------------------------------------------------------------------------------------------------------


def record_progress(job_id: str, step: int, steps: int, now: float | None = None) -> None:
    """Progress only moves forward. Events are handled concurrently, so a step may arrive after the result: it
    still counts, but can never move a finished job backwards. The step rate for the time left is kept as
    training keeps it (``esd.progress.with_eta``), with the time of this report so a reader can count down."""
    now = timezone.now().timestamp() if now is None else now
    with transaction.atomic():
        job = (
            InferenceJob.objects.select_for_update()
            .filter(pk=job_id)
            .only("id", "progress_step", "progress_steps", "progress_mark")
            .first()
        )
        if job is None or step < job.progress_step:
            return
        mark = {k: v for k, v in (job.progress_mark or {}).items() if k in ("rate_mark", "eta_seconds")}
        estimate = with_eta({"step": step, "steps": steps, **mark}, now)
        job.progress_step, job.progress_steps = step, steps
        job.progress_mark = {
            **{k: estimate[k] for k in ("rate_mark", "eta_seconds") if k in estimate},
            "reported": now,
        }
        job.save(update_fields=["progress_step", "progress_steps", "progress_mark"])


def record_started(job_id: str) -> None:
    """A worker took the job from its queue: it is no longer queued (the first report counts)."""
    InferenceJob.objects.filter(pk=job_id, worker_started__isnull=True).update(worker_started=timezone.now())


def progress_of(job: InferenceJob, now: float | None = None) -> dict[str, Any]:
    """``{"step", "total", "eta_seconds"}`` of ``GET /inferences/{id}`` and the console (``total`` is 0 before a
    worker reported a step). The estimate counts down from the last report; it is 0 once the job succeeded and
    None while unknown (before a second report) or after a failure."""
    eta: float | None = None
    mark = job.progress_mark or {}
    if job.status == InferenceStatus.SUCCEED and job.progress_steps:
        eta = 0.0
    elif job.status == InferenceStatus.IN_PROGRESS and isinstance(mark.get("eta_seconds"), int | float):
        now = timezone.now().timestamp() if now is None else now
        since = now - mark["reported"] if isinstance(mark.get("reported"), int | float) else 0.0
        eta = round(max(0.0, mark["eta_seconds"] - max(0.0, since)), 1)
    return {"step": job.progress_step, "total": job.progress_steps, "eta_seconds": eta}


def queue_position(job: InferenceJob) -> int | None:
    """How many jobs of the same endpoint are queued ahead of this one (0: it is next), for a self-hosted job that
    is started and that no worker has taken yet; None otherwise. One indexed count, whatever the backlog."""
    if (
        job.status != InferenceStatus.IN_PROGRESS
        or job.backend != "self-hosted"
        or job.worker_started is not None
        or job.start_time is None
    ):
        return None
    return (
        InferenceJob.objects.filter(
            endpoint_id_copy=job.endpoint_id_copy, status=InferenceStatus.IN_PROGRESS, worker_started__isnull=True
        )
        .filter(Q(start_time__lt=job.start_time) | Q(start_time=job.start_time, id__lt=job.id))
        .count()
    )


def read_location(uri: str) -> bytes | None:
    """The object at an ``s3://`` URI (our bucket through the blob store, another through boto3), or None."""
    store = blob_store()
    key = store.key_of(uri)
    if key is not None:
        try:
            return store.read_bytes(key)
        except FileNotFoundError:
            return None
    from botocore.exceptions import ClientError

    from esd.aws import client

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError:
        return None


def check_async(job: InferenceJob) -> None:
    """The sweeper's look at one SageMaker async job: an output or a failure file means it is done."""
    if job.output_location and (raw := read_location(job.output_location)) is not None:
        ingest_output(str(job.id), raw)
    elif job.failure_location and (raw := read_location(job.failure_location)) is not None:
        fail_job(str(job.id), {"error": raw[:4000].decode("utf-8", "replace")})


def fail_timed_out() -> int:
    """Jobs in progress longer than ``ESD_ASYNC_TIMEOUT`` will not finish (contract §10.3)."""
    limit = timezone.now() - timedelta(seconds=settings.ESD_ASYNC_TIMEOUT)
    late = list(
        InferenceJob.objects.filter(status=InferenceStatus.IN_PROGRESS, start_time__lt=limit).values_list(
            "pk", flat=True
        )
    )
    for job_id in late:
        fail_job(str(job_id), {"error": f"no result within {settings.ESD_ASYNC_TIMEOUT} s"})
    return len(late)


def fail_jobs_of_endpoint(endpoint: Endpoint) -> int:
    """The endpoint is gone: its in-progress jobs cannot finish."""
    with transaction.atomic():
        running = InferenceJob.objects.select_for_update().filter(
            endpoint_id_copy=str(endpoint.id), status=InferenceStatus.IN_PROGRESS
        )
        owners = dict(running.values_list("pk", "owner"))
        InferenceJob.objects.filter(pk__in=owners).update(
            status=InferenceStatus.FAILED, complete_time=timezone.now(), sagemaker_raw="endpoint deleted"
        )
        for job_id, owner in owners.items():
            ended(str(job_id), owner)
    return len(owners)


def _runtime_seconds(info: Any) -> float | None:
    try:
        value = json.loads(info).get("generation_seconds") if isinstance(info, str) else None
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


# --- delete ----------------------------------------------------------------------------------------------------------


def delete_jobs(jobs: list[InferenceJob], cancelled_by: str | None = None) -> int:
    """Parameters, the async request, raw output (and failure file), results and the row; a result arriving later
    finds no row and is dropped.

    With ``cancelled_by`` (``DELETE /inferences``), a job in progress is cancelled first, so its worker stops it;
    its cancel marker is kept (like a training's), since the worker may not have polled it yet."""
    store = blob_store()
    for job in jobs:
        job_id = str(job.id)
        if cancelled_by is not None and job.status == InferenceStatus.IN_PROGRESS:
            with contextlib.suppress(BadRequest):  # it ended meanwhile: nothing to stop
                cancel_job(job, cancelled_by)
        elif job.status in TERMINAL:
            store.delete(cancel_marker(job))
        store.delete(params_key(job))
        store.delete(keys.raw_output(job_id))
        if job.backend == "sagemaker" and job.inference_type == "Async":
            store.delete(keys.async_input(job.endpoint_name, job_id))
        for location in (job.output_location, job.failure_location):
            if location and (key := store.key_of(location)):
                store.delete(key)
        store.delete_folder(keys.job_folder(job_id))
        job.delete()
    return len(jobs)
