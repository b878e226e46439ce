"""``/checkpoints`` (contract §9.4). Thin: parse, call a service, render through the serializers."""

from __future__ import annotations

from django.db.models import Prefetch
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import User, held_role_names
from apps.models_registry import services
from apps.models_registry.api import schemas
from apps.models_registry.api.serializers import (
    CheckpointDownloadsSerializer,
    CheckpointListSerializer,
    CheckpointUpdateSerializer,
    CheckpointUploadSerializer,
)
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from esd.api.errors import BadRequest
from esd.api.openapi import Answer
from esd.api.pagination import numbered_page
from esd.api.validation import Query
from esd.api.views import EsdViewSet, envelope, operation, uuid_list
from esd.owners import owned_by

TAGS = ["Checkpoints"]
DOWNLOADING = "Checkpoint creation in progress, please check later"
RENAMING = "rename is processing, please wait"


def known_user(username: str) -> User:
    """The user a ``username`` filter names; ESD refuses an unknown one with 400."""
    user = User.objects.filter(username=username).first()
    if user is None:
        raise BadRequest(f'user: "{username}" not exist')
    return user


class CheckpointViewSet(EsdViewSet):
    model = Checkpoint
    required = {
        "list": ("checkpoint:all", "checkpoint:list"),
        "create": ("checkpoint:all", "checkpoint:create"),
        "bulk_destroy": ("checkpoint:all", "checkpoint:create"),
        "update": ("checkpoint:all", "checkpoint:create"),
    }
    not_found = {"update": "checkpoint not found with id {id}"}

    @operation(
        operation_id="ListCheckpoints",
        summary="List checkpoints visible to the caller, newest first",
        tags=TAGS,
        query=(
            Query("page", kind="int", default=1),
            Query("per_page", kind="limit", default=10, description="-1 or more than ESD_PAGE_MAX: the cap"),
            Query("username", description="Only checkpoints this user can use"),
            Query("status", kind="enum", choices=tuple(schemas.STATUSES), many=True),
            Query("types", kind="enum", choices=tuple(schemas.TYPES), many=True),
            Query("roles", many=True, description="Only checkpoints owned by one of these roles"),
        ),
        responses={200: CheckpointListSerializer},
    )
    def list(self, request: Request) -> Response:
        query = request.esd_query
        checkpoints = self.get_queryset()
        if query["username"] is not None:
            checkpoints = checkpoints & Checkpoint.objects.usable_by(known_user(query["username"]))
        if query["status"]:
            checkpoints = checkpoints.filter(status__in=query["status"])
        if query["types"]:
            checkpoints = checkpoints.filter(checkpoint_type__in=query["types"])
        if query["roles"]:
            checkpoints = checkpoints.filter(owned_by(CheckpointOwner, query["roles"], unowned=False))
        checkpoints = checkpoints.order_by("-created", "-id").prefetch_related(
            Prefetch("files", queryset=CheckpointFile.objects.order_by("position")),
            Prefetch("owners", queryset=CheckpointOwner.objects.order_by("position")),
        )
        page = numbered_page(checkpoints, page=query["page"], per_page=query["per_page"])
        data = {
            "page": page.page,
            "per_page": page.per_page,
            "pages": page.pages,
            "total": page.total,
            "checkpoints": page.rows,
        }
        return envelope(200, CheckpointListSerializer.render(data))

    @operation(
        operation_id="CreateCheckpoint",
        summary="Register a checkpoint: part URLs for a multipart upload, or a download by URL",
        tags=TAGS,
        body=schemas.CREATE,
        responses={
            201: Answer(CheckpointUploadSerializer, description="Multipart upload"),
            202: Answer(CheckpointDownloadsSerializer, message=DOWNLOADING, description="Download by URL started"),
        },
    )
    def create(self, request: Request) -> Response:
        body = request.esd_body
        if "filenames" in body and "urls" in body:
            raise BadRequest("filenames and urls cannot be used together")
        if "filenames" not in body and "urls" not in body:
            raise BadRequest("no checkpoint name (file names) detected")
        common = {
            "checkpoint_type": body["checkpoint_type"],
            "creator": request.user.username,
            "owners": held_role_names(request.user),
            "params": body["params"],
        }
        if "urls" in body:
            created = services.create_from_urls(urls=body["urls"], **common)
            return envelope(202, CheckpointDownloadsSerializer.render({"checkpoints": created}), DOWNLOADING)
        checkpoint, urls = services.create_multipart(files=body["filenames"], **common)
        return envelope(201, CheckpointUploadSerializer.render({"checkpoint": checkpoint, "s3PresignUrl": urls}))

    @operation(
        operation_id="DeleteCheckpoints",
        summary="Delete checkpoints and their files",
        tags=TAGS,
        body=schemas.DELETE,
        keyless_user_ok=True,
        responses={204: None},
    )
    def bulk_destroy(self, request: Request) -> Response:
        ids = uuid_list(request.esd_body["checkpoint_id_list"])
        changeable = Checkpoint.objects.changeable_by(request.user, request.esd_permissions)
        services.delete_checkpoints(changeable.filter(pk__in=ids))
        return envelope(204)

    @operation(
        operation_id="UpdateCheckpoint",
        summary="Complete uploads and activate, enable or disable, or rename a checkpoint",
        tags=TAGS,
        body=schemas.UPDATE,
        keyless_user_ok=True,
        path_params=("id",),
        responses={
            200: Answer(
                CheckpointUpdateSerializer,
                description="`data` when the status changed; none for a rename that changes nothing or an empty body",
                data_required=False,
            ),
            202: Answer(message=RENAMING, description="Rename queued"),
        },
    )
    def update(self, request: Request, id: str) -> Response:
        body = request.esd_body
        checkpoint = self.get_object(queryset=Checkpoint.objects.changeable_by(request.user, request.esd_permissions))
        if "status" in body:
            if checkpoint.open_uploads:
                services.complete_uploads(checkpoint, body["status"], body.get("multi_parts_tags"))
            else:
                services.change_status(checkpoint, body["status"])
            return envelope(200, CheckpointUpdateSerializer.render({"checkpoint": checkpoint}))
        if "name" in body:
            if not services.request_rename(checkpoint, body["name"]):
                return envelope(200, message="no need to update")
            return envelope(202, message=RENAMING)
        return envelope(200)
