"""``/trainings`` (contract §9.8). Every training route needs ``train:all``."""

from __future__ import annotations

from rest_framework.request import Request
from rest_framework.response import Response

from apps.training import training
from apps.training.api import schemas
from apps.training.api.serializers import TrainingCreatedSerializer, TrainingDetailSerializer, TrainingListSerializer
from apps.training.models import TrainingJob
from esd.api.pagination import keyset_page
from esd.api.validation import Problems, Query, check
from esd.api.views import EsdViewSet, Operation, envelope, operation, uuid_list

TAGS = ["Trainings"]
TRAIN = ("train:all",)


class TrainingViewSet(EsdViewSet):
    model = TrainingJob
    required = {"list": TRAIN, "create": TRAIN, "bulk_destroy": TRAIN, "retrieve": TRAIN}
    not_found = {"retrieve": "Job with id {id} not found"}

    def validate(self, request: Request, spec: Operation) -> None:
        """Pick the body form (document form when training_params has an s3 path), then check it."""
        if self.action != "create":
            return
        params = request.esd_body["params"]
        training_params = params.get("training_params")
        document = isinstance(training_params, dict) and (
            "s3_model_path" in training_params or "s3_data_path" in training_params
        )
        problems = Problems()
        check(schemas.DOCUMENT_PARAMS if document else schemas.NATIVE_PARAMS, params, "params", problems)
        problems.raise_if_any()

    @operation(
        operation_id="ListTrainings",
        summary="List trainings visible to the caller, newest first",
        tags=TAGS,
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
        ),
        responses={200: TrainingListSerializer},
    )
    def list(self, request: Request) -> Response:
        query = request.esd_query
        page = keyset_page(
            self.get_queryset(),
            order=("created", "id"),
            limit=query["limit"],
            start_key=query["exclusive_start_key"],
        )
        data = {"trainings": page.rows, "last_evaluated_key": page.last_evaluated_key}
        return envelope(200, TrainingListSerializer.render(data))

    @operation(
        operation_id="CreateTrainingJob",
        summary="Train a LoRA with kohya settings on a dataset",
        tags=TAGS,
        body=schemas.CREATE_TRAINING,
        responses={201: TrainingCreatedSerializer},
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        job = training.create_training(
            user=request.user,
            permissions=request.esd_permissions,
            lora_train_type=body["lora_train_type"],
            params=body["params"],
        )
        return envelope(201, TrainingCreatedSerializer.render(job))

    @operation(
        operation_id="DeleteTrainingJobs",
        summary="Stop and delete trainings (a completed job's LoRA stays)",
        tags=TAGS,
        body=schemas.DELETE_TRAININGS,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        ids = uuid_list(request.esd_body["training_id_list"])
        training.delete_trainings(list(self.get_queryset().filter(pk__in=ids)))
        return envelope(204)

    @operation(
        operation_id="GetTrainingJob",
        summary="A training's status and parameters",
        tags=TAGS,
        path_params=("id",),
        responses={200: TrainingDetailSerializer},
    )
    def retrieve(self, request: Request, id: str) -> Response:
        return envelope(200, TrainingDetailSerializer.render(self.get_object()))


def webhook_data(job_id: str) -> dict | None:
    """The job as ``GET /trainings/{id}`` returns its ``data``: what its webhooks carry (``apps.accounts.webhooks``)."""
    job = TrainingJob.objects.filter(pk=job_id).first()
    return None if job is None else TrainingDetailSerializer.render(job)
