"""Inference actors and event handlers: real-time invocations, worker events, the async sweeper."""

from __future__ import annotations

import json
import logging
import uuid

import dramatiq
from django.conf import settings
from django.core.exceptions import ValidationError
from django.dispatch import receiver
from django.utils import timezone

from apps.endpoints.services import endpoint_removed
from apps.inference import services
from apps.inference.choices import InferenceStatus
from apps.inference.models import InferenceJob
from esd import keys
from esd.storage import blob_store
from esd.tasks import handles, periodic, recoverer

log = logging.getLogger(__name__)


@dramatiq.actor(max_retries=0, time_limit=10 * 60 * 1000)
def invoke_realtime(job_id: str) -> None:
    """SageMaker real-time: the invocation runs here, not in the web request, so a 504 never loses the result."""
    from botocore.exceptions import BotoCoreError, ClientError

    from esd.aws import client

    job = InferenceJob.objects.filter(pk=job_id, status=InferenceStatus.IN_PROGRESS).first()
    if job is None:
        return
    request = services.build_request(job, self_hosted=False)
    invoked = timezone.now()
    try:
        answer = client("sagemaker-runtime").invoke_endpoint(
            EndpointName=job.endpoint_name,
            Body=json.dumps(request).encode(),
            ContentType="application/json",
            Accept="application/json",
            InferenceId=job_id,
        )
        raw = answer["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        services.fail_job(job_id, {"error": str(exc)})
        return
    received = timezone.now()
    arrival = services.Arrival(received, run_seconds=(received - invoked).total_seconds())
    services.ingest_output(job_id, raw, arrival)


def _seconds(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else None


@handles("inference")
def worker_result(event: dict) -> None:
    """A self-hosted worker finished a job: its raw output is at the job's output key either way."""
    job_id = event.get("inferenceId")
    if not isinstance(job_id, str):
        return
    arrival = services.Arrival(
        timezone.now(), run_seconds=_seconds(event.get("runSeconds")), gpu_seconds=_seconds(event.get("gpuSeconds"))
    )
    try:
        raw = blob_store().read_bytes(keys.raw_output(job_id))
    except FileNotFoundError:
        raw = None
    if raw is None and event.get("invocationStatus") == "Failed":
        services.fail_job(job_id, {"error": event.get("failureReason") or "the worker reported a failure"}, arrival)
        return
    services.ingest_output(job_id, raw, arrival)


@handles("progress")
def worker_progress(event: dict) -> None:
    """A step of a running job (validated as the worker built it: a bad event is dropped with a log)."""
    event = _valid(event)
    if event is not None:
        services.record_progress(event["inferenceId"], event["step"], event["steps"])


@handles("started")
def worker_started(event: dict) -> None:
    """A worker took a job from its queue: the job stops counting as queued (``queue_position``)."""
    event = _valid(event)
    if event is not None:
        services.record_started(event["inferenceId"])


def _valid(event: dict) -> dict | None:
    from gpu_runtime import protocol

    try:
        protocol.validate_event(event)
        uuid.UUID(event["inferenceId"])
    except (protocol.ProtocolError, ValueError) as exc:
        log.warning("ignoring a %s event: %s", event.get("kind"), exc)
        return None
    return event


def sweep_interval() -> int:
    return 30


@periodic(sweep_interval)
def sweep_inferences() -> None:
    """Async SageMaker jobs whose output (or failure) has appeared, notifications, and jobs that timed out."""
    if settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE:
        try:
            drain_notifications()
        except Exception:  # the queue is a shortcut: the output locations below are always checked
            log.exception("could not drain the SageMaker notification queue")
    running = InferenceJob.objects.filter(
        status=InferenceStatus.IN_PROGRESS, backend="sagemaker", inference_type="Async"
    ).exclude(output_location=None)
    for job in running.only("id", "output_location", "failure_location"):
        try:
            services.check_async(job)
        except Exception:
            log.exception("could not check async job %s", job.id)
    services.fail_timed_out()


def drain_notifications() -> int:
    """Completion notices SageMaker sent to SNS, delivered to our SQS queue (contract §12.1)."""
    from esd.aws import client

    sqs = client("sqs")
    answer = sqs.receive_message(
        QueueUrl=settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE, MaxNumberOfMessages=10, WaitTimeSeconds=0
    )
    count = 0
    for message in answer.get("Messages", []):
        try:
            notice = json.loads(message["Body"])
            if "Message" in notice and "inferenceId" not in notice:  # SNS envelope without raw delivery
                notice = json.loads(notice["Message"])
            job_id = notice["inferenceId"]
            if notice.get("invocationStatus") == "Completed":
                location = (notice.get("responseParameters") or {}).get("outputLocation")
                services.ingest_output(job_id, services.read_location(location) if location else None)
            else:
                services.fail_job(
                    job_id,
                    {"error": notice.get("failureReason") or "SageMaker reported a failure", "notification": notice},
                )
            count += 1
        except (KeyError, ValueError, TypeError, ValidationError):  # ValidationError: an inferenceId not a UUID
            log.warning("ignoring unreadable notification %r", message.get("Body", "")[:200])
        sqs.delete_message(QueueUrl=settings.ESD_SAGEMAKER_NOTIFICATION_QUEUE, ReceiptHandle=message["ReceiptHandle"])
    return count


@receiver(endpoint_removed)
def fail_jobs_of_removed_endpoint(sender, endpoint, **kwargs) -> None:
    services.fail_jobs_of_endpoint(endpoint)


@recoverer("self-hosted inference jobs")
def recover_jobs() -> int:
    """In-progress self-hosted jobs whose messages an in-process broker lost on restart: send them again (a
    worker runs a job id once, and results are recorded once)."""
    import dramatiq as _dramatiq
    from dramatiq.brokers.stub import StubBroker

    if not isinstance(_dramatiq.get_broker(), StubBroker):
        return 0  # a real broker kept them
    pending = InferenceJob.objects.filter(status=InferenceStatus.IN_PROGRESS, backend="self-hosted").select_related(
        "endpoint"
    )
    count = 0
    for job in pending:
        if job.endpoint is None:
            continue
        services.send_to_worker(job.endpoint.queue_name, str(job.id), services.build_request(job, self_hosted=True))
        count += 1
    return count
