"""``/datasets`` (contract §9.5). Every dataset route needs ``train:all``."""

from __future__ import annotations

from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import held_role_names
from apps.training import services
from apps.training.api import schemas
from apps.training.api.serializers import (
    DatasetCreatedSerializer,
    DatasetDetailSerializer,
    DatasetListSerializer,
    DatasetStatusSerializer,
)
from apps.training.models import Dataset
from esd.api.pagination import keyset_page
from esd.api.validation import Query
from esd.api.views import EsdViewSet, envelope, operation

TAGS = ["Datasets"]
TRAIN = ("train:all",)


class DatasetViewSet(EsdViewSet):
    model = Dataset
    lookup_field = "name"
    lookup_url_kwarg = "name"
    required = {"list": TRAIN, "create": TRAIN, "bulk_destroy": TRAIN, "retrieve": TRAIN, "update": TRAIN}
    not_found = {"retrieve": "dataset {name} is not found", "update": "dataset {name} is not found"}

    @operation(
        operation_id="ListDatasets",
        summary="List datasets visible to the caller, newest first",
        tags=TAGS,
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
            Query("dataset_status", kind="enum", choices=tuple(schemas.STATUSES)),
        ),
        responses={200: DatasetListSerializer},
    )
    def list(self, request: Request) -> Response:
        query = request.esd_query
        datasets = self.get_queryset()
        if query["dataset_status"]:
            datasets = datasets.filter(status=query["dataset_status"])
        page = keyset_page(
            datasets, order=("created", "id"), limit=query["limit"], start_key=query["exclusive_start_key"]
        )
        data = {"datasets": page.rows, "last_evaluated_key": page.last_evaluated_key}
        return envelope(200, DatasetListSerializer.render(data))

    @operation(
        operation_id="CreateDataset",
        summary="Register a dataset and get an upload URL per file",
        tags=TAGS,
        body=schemas.CREATE_DATASET,
        responses={201: DatasetCreatedSerializer},
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        dataset, urls = services.create_dataset(
            name=body["dataset_name"],
            creator=request.user.username,
            owners=held_role_names(request.user),
            params=body["params"],
            prefix=body.get("prefix", ""),
            content=body["content"],
        )
        return envelope(201, DatasetCreatedSerializer.render({"datasetName": dataset.name, "s3PresignUrl": urls}))

    @operation(
        operation_id="DeleteDatasets",
        summary="Delete datasets and their files",
        tags=TAGS,
        body=schemas.DELETE_DATASETS,
        keyless_user_ok=True,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        services.delete_datasets(self.get_queryset().filter(name__in=request.esd_body["dataset_name_list"]))
        return envelope(204)

    @operation(
        operation_id="GetDataset",
        summary="A dataset with its files and preview URLs",
        tags=TAGS,
        path_params=("name",),
        responses={200: DatasetDetailSerializer},
    )
    def retrieve(self, request: Request, name: str) -> Response:
        return envelope(200, DatasetDetailSerializer.render(self.get_object()))

    @operation(
        operation_id="UpdateDataset",
        summary="Set the status of a dataset and its files",
        tags=TAGS,
        body=schemas.UPDATE_DATASET,
        path_params=("name",),
        responses={200: DatasetStatusSerializer},
    )
    def update(self, request: Request, name: str) -> Response:
        dataset = self.get_object()
        services.set_status(dataset, request.esd_body["status"])
        return envelope(200, DatasetStatusSerializer.render(dataset))
