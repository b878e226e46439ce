"""Training actors and event handlers: self-hosted worker events and the SageMaker training monitor."""

from __future__ import annotations

import logging

import dramatiq

from apps.training import training
from apps.training.choices import TERMINAL_TRAINING, TrainingStatus
from apps.training.models import TrainingJob
from esd.tasks import handles, periodic, recoverer

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("epoch", "epochs", "step", "steps", "loss")
ENDINGS = {"Completed": TrainingStatus.COMPLETED, "Failed": TrainingStatus.FAILED, "Stopped": TrainingStatus.STOPPED}


@handles("training")
def worker_training_event(event: dict) -> None:
    """``{"kind":"training","id","status","reason","attempt","saved", ...progress}`` from a self-hosted trainer;
    events of an earlier run of a resumed job (a late ``Failed``, a stray step) are ignored."""
    from gpu_runtime import protocol

    job_id, status = event.get("id"), event.get("status")
    if not isinstance(job_id, str) or not isinstance(status, str):
        return
    attempt = event.get("attempt", 1) if isinstance(event.get("attempt", 1), int) else 1
    reason = str(event.get("reason") or "")
    notes = [str(w) for w in event.get("warnings") or []] if isinstance(event.get("warnings"), list) else []
    saved = []
    for index, entry in enumerate(event.get("saved") or [] if isinstance(event.get("saved"), list) else []):
        try:
            saved.append(protocol.saved_entry(entry, f"saved[{index}]"))
        except protocol.ProtocolError as exc:
            log.warning("training %s: ignoring a saved entry: %s", job_id, exc)
    if status in ENDINGS:
        seconds = event.get("seconds")
        gpu_seconds = float(seconds) if isinstance(seconds, int | float) and seconds >= 0 else None
        training.finish(
            job_id, ENDINGS[status], reason, notes=notes, saved=saved, gpu_seconds=gpu_seconds, attempt=attempt
        )
        return
    progress = {k: event[k] for k in PROGRESS_KEYS if isinstance(event.get(k), int | float)}
    if isinstance(event.get("worker"), str) and event["worker"]:
        progress["worker"] = event["worker"][:200]
    training.update_status(job_id, status, reason, progress=progress, notes=notes, saved=saved, attempt=attempt)


def lost_workers_interval() -> int:
    from django.conf import settings

    return settings.ESD_ENDPOINT_SWEEP_SECONDS


@periodic(lost_workers_interval)
def fail_trainings_of_lost_workers() -> None:
    """Every few minutes: ``training.fail_lost``."""
    failed = training.fail_lost()
    if failed:
        log.warning("failed %d training(s) whose worker stopped heartbeating", failed)


@dramatiq.actor(max_retries=5, min_backoff=10_000, max_backoff=120_000, time_limit=120_000)
def monitor_sagemaker_training(job_id: str, delay_ms: int = 30_000) -> None:
    """Poll ``DescribeTrainingJob``: its SecondaryStatus becomes ours verbatim; the end is recorded by ``finish``."""
    from botocore.exceptions import ClientError

    from esd.aws import client

    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None or job.status in TERMINAL_TRAINING or not job.sagemaker_name:
        return
    try:
        described = client("sagemaker").describe_training_job(TrainingJobName=job.sagemaker_name)
    except ClientError as exc:
        if "not found" in str(exc).lower() or "could not find" in str(exc).lower():
            training.finish(job_id, TrainingStatus.STOPPED, "the SageMaker training job no longer exists")
            return
        raise
    primary = described.get("TrainingJobStatus")
    secondary = described.get("SecondaryStatus") or primary or job.status
    reason = described.get("FailureReason", "")
    seconds = sagemaker_gpu_seconds(described)
    if primary == "Completed":
        training.finish(job_id, TrainingStatus.COMPLETED, gpu_seconds=seconds)
    elif primary == "Failed":
        training.finish(job_id, TrainingStatus.FAILED, reason or "SageMaker reported a failure", gpu_seconds=seconds)
    elif primary == "Stopped":
        training.finish(job_id, TrainingStatus.STOPPED, reason, gpu_seconds=seconds)
    else:
        training.update_status(job_id, secondary, reason)
        monitor_sagemaker_training.send_with_options(args=(job_id, min(delay_ms * 2, 300_000)), delay=delay_ms)


def sagemaker_gpu_seconds(described: dict) -> float | None:
    """A finished SageMaker training's GPU-seconds from ``DescribeTrainingJob``: ``TrainingTimeInSeconds`` times
    the instance count (every instance held its GPUs that long), else ``BillableTimeInSeconds`` (already summed
    over instances, less managed-spot savings); None when SageMaker reports neither."""
    count = (described.get("ResourceConfig") or {}).get("InstanceCount") or 1
    trained = described.get("TrainingTimeInSeconds")
    if isinstance(trained, int | float) and trained >= 0:
        return float(trained) * (count if isinstance(count, int) and count > 0 else 1)
    billable = described.get("BillableTimeInSeconds")
    return float(billable) if isinstance(billable, int | float) and billable >= 0 else None


@recoverer("trainings")
def recover_trainings() -> int:
    """Monitors of SageMaker trainings; self-hosted trainings an in-process broker lost on restart: queued ones are
    sent again, interrupted ones failed (with a saved state they can be resumed from it)."""
    import tomllib

    import dramatiq as _dramatiq
    from dramatiq.brokers.stub import StubBroker

    from apps.training.models import Dataset
    from esd.storage import blob_store

    count = 0
    running = TrainingJob.objects.exclude(status__in=TERMINAL_TRAINING)
    for job in running.filter(backend="sagemaker").exclude(sagemaker_name=None):
        monitor_sagemaker_training.send(str(job.id))
        count += 1
    if not isinstance(_dramatiq.get_broker(), StubBroker):
        return count
    for job in running.exclude(backend="sagemaker"):
        if job.status != TrainingStatus.STARTING:
            hint = ": resume it from its latest state" if training.latest_state(job) else ""
            training.finish(str(job.id), TrainingStatus.FAILED, "interrupted by a restart of the server" + hint)
            continue
        params = job.params["training_params"]
        store = blob_store()
        config = tomllib.loads(store.read_bytes(store.key_of(params["s3_toml_path"])).decode())
        dataset = Dataset.objects.filter(name=params["dataset"]).first()
        if dataset is None:
            training.finish(str(job.id), TrainingStatus.FAILED, "its dataset was deleted")
            continue
        spec = training.training_spec(job, config, store.key_of(params["s3_model_path"]), dataset)
        training.send_training(str(job.id), spec)
        count += 1
    return count
