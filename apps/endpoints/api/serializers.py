"""Response shapes of ``/endpoints`` (contract §9.6): they render the data and document it.

ESD answers the instance counts as strings and the times in UTC without zone; both are kept as ESD sends them.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.endpoints.choices import Backend, EndpointStatus, EndpointType
from apps.endpoints.models import Endpoint
from esd.api.formats import utc_string
from esd.api.serializers import EsdSerializer, StringListField


class UtcStringField(serializers.CharField):
    """A moment as ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC (``esd.api.formats.utc_string``)."""

    def to_representation(self, value: Any) -> str | None:
        return utc_string(value)


class EndpointSerializer(EsdSerializer):
    """One endpoint (``owners`` prefetched in order, see ``with_owners``)."""

    EndpointDeploymentJobId = serializers.CharField(source="id")
    autoscaling = serializers.BooleanField()
    max_instance_number = serializers.CharField()
    min_instance_number = serializers.CharField()
    startTime = UtcStringField(source="start_time")
    endTime = UtcStringField(source="end_time", allow_null=True)
    status = serializers.SerializerMethodField()
    instance_type = serializers.CharField()
    current_instance_count = serializers.CharField()
    endpoint_status = serializers.ChoiceField(choices=EndpointStatus.values, source="status")
    endpoint_name = serializers.CharField(source="name")
    error = serializers.SerializerMethodField()
    endpoint_type = serializers.ChoiceField(choices=EndpointType.values)
    owner_group_or_role = serializers.SerializerMethodField()
    custom_extensions = serializers.CharField()
    backend = serializers.ChoiceField(choices=Backend.values)

    @extend_schema_field(serializers.CharField(allow_null=True, help_text="Always null (legacy)"))
    def get_status(self, endpoint: Endpoint) -> None:
        return None

    @extend_schema_field(serializers.CharField(allow_null=True, help_text="Why it failed; null when it did not"))
    def get_error(self, endpoint: Endpoint) -> str | None:
        return endpoint.error or None

    @extend_schema_field(StringListField(help_text="The owner roles"))
    def get_owner_group_or_role(self, endpoint: Endpoint) -> list[str]:
        return [o.name for o in endpoint.owners.all()]


class EndpointListSerializer(EsdSerializer):
    endpoints = EndpointSerializer(many=True)
    last_evaluated_key = serializers.CharField(allow_null=True, help_text="exclusive_start_key of the next page")
