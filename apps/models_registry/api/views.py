"""``/checkpoints`` (contract §9.4)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiResponse
from rest_framework.request import Request
from rest_framework.response import Response

from apps.accounts.models import User, held_role_names
from apps.models_registry import services
from apps.models_registry.api import schemas
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from esd.api.errors import BadRequest, NotFound
from esd.api.formats import epoch_string, utc_string
from esd.api.legacy import EsdView, envelope_schema, route
from esd.api.pagination import numbered_page
from esd.api.validation import Query
from esd.api.views import envelope, find, uuid_list
from esd.owners import owned_by
from esd.storage import blob_store

TAGS = ["Checkpoints"]


def render_params(checkpoint: Checkpoint) -> dict[str, Any]:
    """The client's params plus the server's: creator, created, multipart_upload, error (contract §9.4)."""
    params = {**checkpoint.params, "creator": checkpoint.creator, "created": utc_string(checkpoint.created)}
    if checkpoint.uploads:
        params["multipart_upload"] = {
            name: {"bucket": settings.ESD_BUCKET, "upload_id": info["upload_id"], "key": info["key"]}
            for name, info in checkpoint.uploads.items()
        }
    if checkpoint.error:
        params["error"] = checkpoint.error
    return params


def render_short(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": str(checkpoint.id),
        "type": checkpoint.checkpoint_type,
        "s3_location": blob_store().uri(checkpoint.prefix),
        "status": checkpoint.status,
        "params": render_params(checkpoint),
    }


def render_item(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "id": str(checkpoint.id),
        "s3Location": blob_store().uri(checkpoint.prefix),
        "type": checkpoint.checkpoint_type,
        "status": checkpoint.status,
        "name": [f.name for f in checkpoint.files.all()],
        "created": epoch_string(checkpoint.created),
        "params": render_params(checkpoint),
        "allowed_roles_or_users": [o.name for o in checkpoint.owners.all()],
    }


def known_user(username: str) -> User:
    user = User.objects.filter(username=username).first()
    if user is None:
        raise BadRequest(f'user: "{username}" not exist')
    return user


class CheckpointsView(EsdView):
    @route(
        operation_id="ListCheckpoints",
        summary="List checkpoints visible to the caller, newest first",
        tags=TAGS,
        permissions=("checkpoint:all", "checkpoint:list"),
        query=(
            Query("page", kind="int", default=1),
            Query("per_page", kind="limit", default=10, description="-1 or more than ESD_PAGE_MAX: the cap"),
            Query("username", description="Only checkpoints this user can use"),
            Query("status", kind="enum", choices=tuple(schemas.STATUSES), many=True),
            Query("types", kind="enum", choices=tuple(schemas.TYPES), many=True),
            Query("roles", many=True, description="Only checkpoints owned by one of these roles"),
        ),
        responses={200: schemas.LIST},
    )
    def get(self, request: Request) -> Response:
        query = request.esd_query
        checkpoints = self.visible(Checkpoint)
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
        return envelope(
            200,
            {
                "page": page.page,
                "per_page": page.per_page,
                "pages": page.pages,
                "total": page.total,
                "checkpoints": [render_item(c) for c in page.rows],
            },
        )

    @route(
        operation_id="CreateCheckpoint",
        summary="Register a checkpoint: part URLs for a multipart upload, or a download by URL",
        tags=TAGS,
        permissions=("checkpoint:all", "checkpoint:create"),
        body=schemas.CREATE,
        responses={
            201: OpenApiResponse(response=envelope_schema(201, schemas.CREATED), description="Multipart upload"),
            202: OpenApiResponse(
                response=envelope_schema(202, schemas.ACCEPTED, "Checkpoint creation in progress, please check later"),
                description="Download by URL started",
            ),
        },
    )
    def post(self, request: Request) -> Response:
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
            return envelope(
                202,
                {"checkpoints": [render_short(c) for c in created]},
                "Checkpoint creation in progress, please check later",
            )
        checkpoint, urls = services.create_multipart(files=body["filenames"], **common)
        return envelope(201, {"checkpoint": render_short(checkpoint), "s3PresignUrl": urls})

    @route(
        operation_id="DeleteCheckpoints",
        summary="Delete checkpoints and their files",
        tags=TAGS,
        permissions=("checkpoint:all", "checkpoint:create"),
        body=schemas.DELETE,
        keyless_user_ok=True,
        responses={204: None},
    )
    def delete(self, request: Request) -> Response:
        ids = uuid_list(request.esd_body["checkpoint_id_list"])
        changeable = Checkpoint.objects.changeable_by(request.user, request.esd_permissions)
        services.delete_checkpoints(changeable.filter(pk__in=ids))
        return envelope(204)


class CheckpointView(EsdView):
    @route(
        operation_id="UpdateCheckpoint",
        summary="Complete uploads and activate, enable or disable, or rename a checkpoint",
        tags=TAGS,
        permissions=("checkpoint:all", "checkpoint:create"),
        body=schemas.UPDATE,
        keyless_user_ok=True,
        path_params=("id",),
        responses={
            200: OpenApiResponse(
                response=envelope_schema(200, schemas.UPDATED, data_required=False),
                description="`data` when the status changed; none for a rename that changes nothing or an empty body",
            ),
            202: OpenApiResponse(
                response=envelope_schema(202, None, "rename is processing, please wait"), description="Rename queued"
            ),
        },
    )
    def put(self, request: Request, id: str) -> Response:
        body = request.esd_body
        checkpoint = find(Checkpoint.objects.changeable_by(request.user, request.esd_permissions), pk=id)
        if checkpoint is None:
            raise NotFound(f"checkpoint not found with id {id}")
        if "status" in body:
            if checkpoint.open_uploads:
                services.complete_uploads(checkpoint, body["status"], body.get("multi_parts_tags"))
            else:
                services.change_status(checkpoint, body["status"])
            return envelope(200, {"checkpoint": render_short(checkpoint)})
        if "name" in body:
            if not services.request_rename(checkpoint, body["name"]):
                return envelope(200, message="no need to update")
            return envelope(202, message="rename is processing, please wait")
        return envelope(200)
