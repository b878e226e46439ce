"""``/trainings`` (contract §9.8). Every training route needs ``train:all``."""

from __future__ import annotations

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from apps.training import training
from apps.training.api import schemas
from apps.training.models import TrainingJob
from esd import keys
from esd.api.errors import NotFound
from esd.api.formats import epoch_string
from esd.api.legacy import EsdView, RouteSpec, route
from esd.api.pagination import keyset_page
from esd.api.validation import Problems, Query, check
from esd.api.views import envelope, find, uuid_list
from esd.storage import blob_store

TAGS = ["Trainings"]
TRAIN = ("train:all",)


def render_params(job: TrainingJob) -> dict[str, Any]:
    params = dict(job.params)
    if job.reason:
        params["resp"] = job.reason
    return params


class TrainingsView(EsdView):
    def validate(self, request: Request, spec: RouteSpec) -> None:
        """Pick the body form (document form when training_params has an s3 path), then check it."""
        if request.method != "POST":
            return
        params = request.esd_body["params"]
        training_params = params.get("training_params")
        document = isinstance(training_params, dict) and (
            "s3_model_path" in training_params or "s3_data_path" in training_params
        )
        problems = Problems()
        check(schemas.DOCUMENT_PARAMS if document else schemas.NATIVE_PARAMS, params, "params", problems)
        problems.raise_if_any()

    @route(
        operation_id="ListTrainings",
        summary="List trainings visible to the caller, newest first",
        tags=TAGS,
        permissions=TRAIN,
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
        ),
        responses={200: schemas.TRAINING_LIST},
    )
    def get(self, request: Request) -> Response:
        query = request.esd_query
        page = keyset_page(
            self.visible(TrainingJob),
            order=("created", "id"),
            limit=query["limit"],
            start_key=query["exclusive_start_key"],
        )
        items = [
            {
                "id": str(job.id),
                "modelName": job.params.get("training_params", {}).get("model_name") or "not_applied",
                "status": job.status,
                "trainType": "Stable-diffusion",
                "created": epoch_string(job.created),
                "sagemakerTrainName": job.sagemaker_name,
                "params": render_params(job),
            }
            for job in page.rows
        ]
        return envelope(200, {"trainings": items, "last_evaluated_key": page.last_evaluated_key})

    @route(
        operation_id="CreateTrainingJob",
        summary="Train a LoRA with kohya settings on a dataset",
        tags=TAGS,
        permissions=TRAIN,
        body=schemas.CREATE_TRAINING,
        responses={201: schemas.TRAINING_CREATED},
    )
    def post(self, request: Request) -> Response:
        body = request.esd_body
        job = training.create_training(
            user=request.user,
            permissions=request.esd_permissions,
            lora_train_type=body["lora_train_type"],
            params=body["params"],
        )
        store = blob_store()
        job_id = str(job.id)
        return envelope(
            201,
            {
                "id": job_id,
                "status": job.status,
                "created": epoch_string(job.created),
                "params": render_params(job),
                "input_location": store.uri(keys.training_input(job_id)),
                "output_location": store.uri(keys.training_output(job_id)),
            },
        )

    @route(
        operation_id="DeleteTrainingJobs",
        summary="Stop and delete trainings (a completed job's LoRA stays)",
        tags=TAGS,
        permissions=TRAIN,
        body=schemas.DELETE_TRAININGS,
        responses={204: None},
    )
    def delete(self, request: Request) -> Response:
        ids = uuid_list(request.esd_body["training_id_list"])
        training.delete_trainings(list(self.visible(TrainingJob).filter(pk__in=ids)))
        return envelope(204)


class TrainingView(EsdView):
    @route(
        operation_id="GetTrainingJob",
        summary="A training's status and parameters",
        tags=TAGS,
        permissions=TRAIN,
        path_params=("id",),
        responses={200: schemas.TRAINING_DETAIL},
    )
    def get(self, request: Request, id: str) -> Response:
        job = find(self.visible(TrainingJob), pk=id)
        if job is None:
            raise NotFound(f"Job with id {id} not found")
        return envelope(
            200,
            {
                "id": str(job.id),
                "checkpoint_id": str(job.id),
                "job_status": job.status,
                "model_id": "kohya",
                "params": render_params(job),
                "timestamp": epoch_string(job.created),
                "train_type": "Stable-diffusion",
            },
        )
