"""Response shapes of ``/checkpoints`` (contract §9.4): they render the data and document it.

The list answers ``s3Location`` with file names, creation time and owners; create and update answer a shorter
summary with ``s3_location`` (ESD's two spellings, kept as ESD sends them).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.models_registry.api.schemas import STATUSES, TYPES
from apps.models_registry.models import Checkpoint
from esd.api.formats import epoch_string, utc_string
from esd.api.serializers import EsdSerializer, FreeObjectField, StringListField
from esd.storage import blob_store


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


class CheckpointParamsField(FreeObjectField):
    """``params`` as answered: the client's keys with the server's added (``render_params``); reads the row."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("source", "*")
        kwargs.setdefault("help_text", "The client's params plus creator, created, multipart_upload, error")
        super().__init__(**kwargs)

    def to_representation(self, value: Checkpoint) -> dict[str, Any]:
        return render_params(value)


class StoreUriField(serializers.CharField):
    """The blob store's URI of a storage prefix (``s3://bucket/prefix``)."""

    def to_representation(self, value: str) -> str:
        return blob_store().uri(value)


class EpochStringField(serializers.CharField):
    """A moment as epoch seconds with six decimals, as a string (ESD's ``created``)."""

    def to_representation(self, value: Any) -> str:
        return epoch_string(value)


class CheckpointSummarySerializer(EsdSerializer):
    """A checkpoint as create and update answer it."""

    id = serializers.CharField()
    type = serializers.ChoiceField(choices=TYPES, source="checkpoint_type")
    s3_location = StoreUriField(source="prefix")
    status = serializers.ChoiceField(choices=STATUSES)
    params = CheckpointParamsField()


class CheckpointSerializer(EsdSerializer):
    """A checkpoint as the list answers it (``files`` and ``owners`` prefetched in order)."""

    id = serializers.CharField()
    s3Location = StoreUriField(source="prefix")
    type = serializers.ChoiceField(choices=TYPES, source="checkpoint_type")
    status = serializers.ChoiceField(choices=STATUSES)
    name = serializers.SerializerMethodField()
    created = EpochStringField(help_text="Epoch seconds with six decimals")
    params = CheckpointParamsField()
    allowed_roles_or_users = serializers.SerializerMethodField()

    @extend_schema_field(StringListField(help_text="The file names"))
    def get_name(self, checkpoint: Checkpoint) -> list[str]:
        return [f.name for f in checkpoint.files.all()]

    @extend_schema_field(StringListField(help_text="The owner roles or users"))
    def get_allowed_roles_or_users(self, checkpoint: Checkpoint) -> list[str]:
        return [o.name for o in checkpoint.owners.all()]


class CheckpointListSerializer(EsdSerializer):
    page = serializers.IntegerField()
    per_page = serializers.IntegerField()
    pages = serializers.IntegerField()
    total = serializers.IntegerField()
    checkpoints = CheckpointSerializer(many=True)


class CheckpointUploadSerializer(EsdSerializer):
    """A checkpoint registered for a multipart upload, with the URLs its parts go to."""

    checkpoint = CheckpointSummarySerializer()
    s3PresignUrl = serializers.DictField(child=StringListField(), help_text="Part URLs per file name")


class CheckpointDownloadsSerializer(EsdSerializer):
    """The checkpoints a download by URL registered (one per URL)."""

    checkpoints = CheckpointSummarySerializer(many=True)


class CheckpointUpdateSerializer(EsdSerializer):
    checkpoint = CheckpointSummarySerializer()
