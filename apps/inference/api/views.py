"""``/inferences`` (contract §9.7)."""

from __future__ import annotations

import json
import time
from typing import Any

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import User
from apps.inference import services
from apps.inference.api import schemas
from apps.inference.api.serializers import (
    CreatedInferenceSerializer,
    InferenceJobDetailSerializer,
    InferenceJobListSerializer,
    StartedInferenceSerializer,
)
from apps.inference.choices import DIFFUSION_TASKS, TERMINAL, InferenceStatus
from apps.inference.models import InferenceJob
from esd import keys
from esd.api.errors import BadRequest, GatewayTimeout
from esd.api.formats import utc_string
from esd.api.openapi import Answer
from esd.api.pagination import keyset_page
from esd.api.validation import Query, clean_json
from esd.api.views import EsdViewSet, Operation, envelope, operation, uuid_list
from esd.storage import blob_store

TAGS = ["Inferences"]
READ = ("inference:all", "inference:list", "inference:create")
WRITE = ("inference:all", "inference:create")


def render_job(job: InferenceJob) -> dict[str, Any]:
    """A job as the list shows it (``InferenceJobSerializer``); its ``params`` name the blob store's URLs."""
    store = blob_store()
    params: dict[str, Any] = {
        "input_body_s3": store.uri(services.params_key(job)),
        "input_body_presign_url": store.presign_get(services.params_key(job), settings.ESD_PRESIGN_EXPIRES),
        "sagemaker_inference_endpoint_id": job.endpoint_id_copy,
        "sagemaker_inference_endpoint_name": job.endpoint_name,
        "sagemaker_inference_instance_type": job.instance_type,
        "output_path": job.output_location,
    }
    if job.task_type in DIFFUSION_TASKS:
        params["used_models"] = job.used_models
    return {
        "InferenceJobId": str(job.id),
        "status": job.status,
        "taskType": job.task_type,
        "inference_type": job.inference_type,
        "owner_group_or_role": [job.owner],
        "createTime": utc_string(job.create_time),
        "startTime": utc_string(job.start_time),
        "completeTime": utc_string(job.complete_time),
        "image_names": job.image_names,
        "inference_info_name": job.inference_info_name,
        "sagemakerRaw": job.sagemaker_raw,
        "payload_string": job.payload_string,
        "params": params,
    }


def render_detail(job: InferenceJob) -> dict[str, Any]:
    """A job with presigned URLs of its images and result parameters (``InferenceJobDetailSerializer``)."""
    store = blob_store()
    expires = settings.ESD_PRESIGN_EXPIRES
    job_id = str(job.id)
    return {
        **render_job(job),
        "img_presigned_urls": [
            store.presign_get(f"{keys.result_prefix(job_id)}/{name}", expires) for name in job.image_names
        ],
        "output_presigned_urls": [store.presign_get(keys.result_params(job_id), expires)],
        "progress": services.progress_of(job),
        "queue_position": services.queue_position(job),
        "gpu_seconds": job.gpu_seconds,
    }


def webhook_data(job_id: str) -> dict[str, Any] | None:
    """The job as ``GET /inferences/{id}`` returns its ``data``: the body of its webhooks (``apps.accounts``)."""
    job = InferenceJob.objects.filter(pk=job_id).first()
    return None if job is None else InferenceJobDetailSerializer.render(render_detail(job))


def start_response(job_id: str) -> Response:
    """What both start routes answer: 202 for async; for real-time, the finished job, its error, or 504."""
    started = services.start_job(job_id)
    job = started.job
    if not started.realtime:
        accepted = {
            "inference": {
                "inference_id": str(job.id),
                "status": InferenceStatus.IN_PROGRESS,
                "endpoint_name": job.endpoint_name,
                "output_path": job.output_location,
            }
        }
        return envelope(202, StartedInferenceSerializer.render(accepted))
    finished = wait_for(job_id, settings.ESD_REALTIME_TIMEOUT)
    if finished is None:
        raise GatewayTimeout()
    if finished.status == InferenceStatus.FAILED:
        raise BadRequest(error_text(finished.sagemaker_raw))
    return envelope(200, InferenceJobDetailSerializer.render(render_detail(finished)))


def wait_for(job_id: str, timeout: float) -> InferenceJob | None:
    """Poll the row until the job ends (a few ms apart at first, at most 100 ms later); None on timeout."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        job = InferenceJob.objects.filter(pk=job_id).first()
        if job is None or job.status in TERMINAL:
            return job
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.1)


def error_text(raw: Any) -> str:
    """The message of a failed job's report (the 400 of a real-time start; the console shows it too)."""
    if isinstance(raw, dict) and isinstance(raw.get("error"), str):
        return raw["error"]
    return raw if isinstance(raw, str) else json.dumps(raw)


class InferenceViewSet(EsdViewSet):
    model = InferenceJob
    required = {
        "list": READ,
        "create": WRITE,
        "bulk_destroy": WRITE,
        "retrieve": READ,
        "start": WRITE,
        "cancel": WRITE,
    }
    not_found = {
        "retrieve": "inference with id {id} not found",
        "start": "InferenceJobId {id} not found",
        "cancel": "InferenceJobId {id} not found",
    }

    @operation(
        operation_id="ListInferenceJobs",
        summary="List inference jobs, newest first",
        tags=TAGS,
        keyless_user_ok=True,
        query=(
            Query("type", kind="enum", choices=tuple(schemas.TASKS), default="txt2img", description="Task type"),
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
            Query("username", description="Jobs of this user"),
        ),
        responses={200: InferenceJobListSerializer},
    )
    def list(self, request: Request) -> Response:
        query = request.esd_query
        jobs = self.get_queryset().filter(task_type=query["type"])
        if query["username"] is not None:
            if not User.objects.filter(username=query["username"]).exists():
                raise BadRequest(f'user: "{query["username"]}" not exist')
            jobs = jobs.filter(owner=query["username"])
        page = keyset_page(
            jobs, order=("create_time", "id"), limit=query["limit"], start_key=query["exclusive_start_key"]
        )
        data = {"inferences": [render_job(j) for j in page.rows], "last_evaluated_key": page.last_evaluated_key}
        return envelope(200, InferenceJobListSerializer.render(data))

    def validate(self, request: Request, spec: Operation) -> None:
        """``payload_string`` must parse to a JSON object (after the schema, before the user and permission)."""
        payload = request.esd_body.get("payload_string") if self.action == "create" else None
        if payload is not None:
            try:
                parsed = json.loads(payload)
            except (ValueError, RecursionError):
                parsed = None
            if not isinstance(parsed, dict) or not clean_json(parsed):
                raise BadRequest("payload_string must be valid json string")

    @operation(
        operation_id="CreateInferenceJob",
        summary="Create an inference job (or, with payload_string, create and start it in one call)",
        tags=TAGS,
        body=schemas.CREATE,
        responses={
            201: Answer(CreatedInferenceSerializer, description="Created"),
            202: Answer(StartedInferenceSerializer, description="One call, Async"),
            200: Answer(InferenceJobDetailSerializer, description="One call, Real-time: the finished job"),
            504: OpenApiResponse(description='One call, Real-time, too slow: {"message":"Endpoint request timed out"}'),
        },
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        job = services.create_job(
            user=request.user,
            permissions=request.esd_permissions,
            task_type=body["task_type"],
            inference_type=body["inference_type"],
            models=body["models"],
            endpoint_name=body.get("sagemaker_endpoint_name") or None,
            payload_string=body.get("payload_string"),
        )
        if job.payload_string is not None:
            return start_response(str(job.id))
        store = blob_store()
        data: dict[str, Any] = {
            "id": str(job.id),
            "type": job.task_type,
            "api_params_s3_location": store.uri(services.params_key(job)),
            "api_params_s3_upload_url": services.upload_url(job),
        }
        if job.task_type in DIFFUSION_TASKS:
            data["models"] = [
                {"id": entry["id"], "name": [entry["model_name"]], "type": model_type}
                for model_type, entries in job.used_models.items()
                for entry in entries
                if entry["id"] != "VAE"
            ]
        return envelope(201, CreatedInferenceSerializer.render({"inference": data}))

    @operation(
        operation_id="DeleteInferenceJobs",
        summary="Delete inference jobs with their parameters and results (a job in progress is cancelled first)",
        tags=TAGS,
        body=schemas.DELETE,
        keyless_user_ok=True,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        ids = uuid_list(request.esd_body["inference_id_list"])
        services.delete_jobs(list(self.get_queryset().filter(pk__in=ids)), cancelled_by=request.user.username)
        return envelope(204)

    @operation(
        operation_id="GetInferenceJob",
        summary="An inference job with presigned URLs of its images and parameter file",
        tags=TAGS,
        keyless_user_ok=True,
        path_params=("id",),
        responses={200: InferenceJobDetailSerializer},
    )
    def retrieve(self, request: Request, id: str) -> Response:
        return envelope(200, InferenceJobDetailSerializer.render(render_detail(self.get_object())))

    @operation(
        operation_id="StartInferenceJob",
        summary="Start a created job: Async answers 202, Real-time waits for the result",
        tags=TAGS,
        path_params=("id",),
        responses={
            202: Answer(StartedInferenceSerializer, description="Async"),
            200: Answer(InferenceJobDetailSerializer, description="Real-time"),
            504: OpenApiResponse(description='Real-time, too slow: {"message":"Endpoint request timed out"}'),
        },
    )
    @action(detail=True, methods=["put"], url_path="start")
    def start(self, request: Request, id: str) -> Response:
        return start_response(str(self.get_object().id))

    @operation(
        operation_id="CancelInferenceJob",
        summary="Cancel a job that has not ended (an addition to ESD)",
        description=(
            'The job is `failed` at once with `sagemakerRaw` `{"error": "cancelled by {user}"}`. A queued '
            "self-hosted job never runs; a running one stops between two denoising steps on its worker (the "
            "worker goes on with its next job, the other jobs of a batched call complete). A SageMaker job's "
            "result is not ingested. A job that has ended: 400."
        ),
        tags=TAGS,
        path_params=("id",),
        responses={200: Answer(InferenceJobDetailSerializer, description="The cancelled job, as GET shows it")},
    )
    @action(detail=True, methods=["put"], url_path="cancel")
    def cancel(self, request: Request, id: str) -> Response:
        job = services.cancel_job(self.get_object(), request.user.username)
        return envelope(200, InferenceJobDetailSerializer.render(render_detail(job)))
