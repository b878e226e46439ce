"""``/datasets`` (contract §9.5). Every dataset route needs ``train:all``."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import held_role_names
from apps.training import services
from apps.training.api import schemas
from apps.training.models import Dataset
from esd.api.errors import NotFound
from esd.api.formats import epoch_string
from esd.api.legacy import EsdView, route
from esd.api.pagination import keyset_page
from esd.api.validation import Query
from esd.api.views import envelope
from esd.storage import blob_store

TAGS = ["Datasets"]
TRAIN = ("train:all",)


def render_dataset(dataset: Dataset) -> dict[str, Any]:
    """The dataset's params merged in; the fixed keys win (contract §9.5)."""
    return {
        **dataset.params,
        "datasetName": dataset.name,
        "s3": blob_store().uri(dataset.folder),
        "status": dataset.status,
        "timestamp": epoch_string(dataset.created),
    }


class DatasetsView(EsdView):
    @route(
        operation_id="ListDatasets",
        summary="List datasets visible to the caller, newest first",
        tags=TAGS,
        permissions=TRAIN,
        query=(
            Query("limit", kind="limit", default=10),
            Query("exclusive_start_key", description="last_evaluated_key of the previous page"),
            Query("dataset_status", kind="enum", choices=tuple(schemas.STATUSES)),
        ),
        responses={200: schemas.LISTED},
    )
    def get(self, request: Request) -> Response:
        query = request.esd_query
        datasets = self.visible(Dataset)
        if query["dataset_status"]:
            datasets = datasets.filter(status=query["dataset_status"])
        page = keyset_page(
            datasets, order=("created", "id"), limit=query["limit"], start_key=query["exclusive_start_key"]
        )
        return envelope(
            200, {"datasets": [render_dataset(d) for d in page.rows], "last_evaluated_key": page.last_evaluated_key}
        )

    @route(
        operation_id="CreateDataset",
        summary="Register a dataset and get an upload URL per file",
        tags=TAGS,
        permissions=TRAIN,
        body=schemas.CREATE_DATASET,
        responses={201: schemas.CREATED},
    )
    def post(self, request: Request) -> Response:
        body = request.esd_body
        dataset, urls = services.create_dataset(
            name=body["dataset_name"],
            creator=request.user.username,
            owners=held_role_names(request.user),
            params=body["params"],
            prefix=body.get("prefix", ""),
            content=body["content"],
        )
        return envelope(201, {"datasetName": dataset.name, "s3PresignUrl": urls})

    @route(
        operation_id="DeleteDatasets",
        summary="Delete datasets and their files",
        tags=TAGS,
        permissions=TRAIN,
        body=schemas.DELETE_DATASETS,
        keyless_user_ok=True,
        responses={204: None},
    )
    def delete(self, request: Request) -> Response:
        services.delete_datasets(self.visible(Dataset).filter(name__in=request.esd_body["dataset_name_list"]))
        return envelope(204)


class DatasetView(EsdView):
    def dataset(self, name: str) -> Dataset:
        dataset = self.visible(Dataset).filter(name=name).first()
        if dataset is None:
            raise NotFound(f"dataset {name} is not found")
        return dataset

    @route(
        operation_id="GetDataset",
        summary="A dataset with its files and preview URLs",
        tags=TAGS,
        permissions=TRAIN,
        path_params=("name",),
        responses={200: schemas.DETAIL},
    )
    def get(self, request: Request, name: str) -> Response:
        dataset = self.dataset(name)
        store = blob_store()
        expires = settings.ESD_DATASET_PREVIEW_EXPIRES
        files = [
            {
                **item.params,
                "key": item.key,
                "name": item.name,
                "type": item.type,
                "preview_url": store.presign_get(dataset.file_key(item.filename), expires),
                "dataStatus": item.status,
                "original_file_name": item.filename,
            }
            for item in dataset.items.all()
        ]
        data = {"dataset_name": dataset.name, "prefix": dataset.prefix, **render_dataset(dataset), "data": files}
        return envelope(200, data)

    @route(
        operation_id="UpdateDataset",
        summary="Set the status of a dataset and its files",
        tags=TAGS,
        permissions=TRAIN,
        body=schemas.UPDATE_DATASET,
        path_params=("name",),
        responses={200: schemas.UPDATED},
    )
    def put(self, request: Request, name: str) -> Response:
        dataset = self.dataset(name)
        services.set_status(dataset, request.esd_body["status"])
        return envelope(200, {"datasetName": dataset.name, "status": dataset.status})
