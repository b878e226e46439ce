"""Console pages for endpoints: status, type, backend, counts, owners, the scaling hint, and deletion."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.accounts.admin import EsdPermissionsAdmin, SharedResourceAdmin, request_permissions
from apps.endpoints import services
from apps.endpoints.models import ColdStart, Endpoint, Worker


@admin.register(Endpoint)
class EndpointAdmin(SharedResourceAdmin):
    bulk_delete = False
    view_permissions = ("sagemaker_endpoint:all", "sagemaker_endpoint:list")
    add_permissions = ()  # deployed through the API (and the console's deploy page)
    change_permissions = ("sagemaker_endpoint:all", "sagemaker_endpoint:create")
    list_display = (
        "name",
        "status",
        "endpoint_type",
        "backend",
        "instance_type",
        "current_instance_count",
        "desired_workers",
        "owner_names",
        "start_time",
    )
    list_filter = ("status", "endpoint_type", "backend")
    search_fields = ("name", "instance_type", "owners__name", "creator")
    ordering = ("-start_time",)
    actions = ["refresh", "delete_endpoints"]
    readonly_fields = (
        "id",
        "name",
        "status",
        "endpoint_type",
        "backend",
        "instance_type",
        "initial_instance_count",
        "min_instance_number",
        "max_instance_number",
        "autoscaling",
        "autoscaling_applied",
        "current_instance_count",
        "desired_workers",
        "custom_extensions",
        "custom_docker_image_uri",
        "creator",
        "start_time",
        "end_time",
        "checked_at",
        "error",
        "owner_names",
    )
    fields = readonly_fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        visible = Endpoint.objects.visible_to(request.user, request_permissions(request))
        return visible.prefetch_related("owners")

    @admin.display(description="Owners")
    def owner_names(self, obj: Endpoint) -> str:
        return ", ".join(o.name for o in obj.owners.all())

    @admin.display(description="Desired workers")
    def desired_workers(self, obj: Endpoint) -> str:
        """The scaling hint of a self-hosted endpoint (SageMaker scales itself)."""
        return str(services.scaling_hint(obj)) if obj.backend == "self-hosted" else "-"

    @admin.action(description="Refresh status from the backend")
    def refresh(self, request: HttpRequest, queryset: QuerySet) -> None:
        for endpoint in queryset:
            services.reconcile(str(endpoint.pk))
        self.message_user(request, f"Refreshed {queryset.count()} endpoint(s).", messages.SUCCESS)

    @admin.action(description="Delete selected endpoints (tear down)")
    def delete_endpoints(self, request: HttpRequest, queryset: QuerySet) -> None:
        changeable = queryset & Endpoint.objects.changeable_by(request.user, request_permissions(request))
        count = services.delete_endpoints(list(changeable))
        self.message_user(request, f"Deleted {count} endpoint(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Endpoint) -> None:
        services.delete_endpoints([obj])


@admin.register(Worker)
class WorkerAdmin(EsdPermissionsAdmin):
    view_permissions = ("sagemaker_endpoint:all", "sagemaker_endpoint:list")
    list_display = ("worker", "endpoint_name", "instance_type", "last_seen")
    list_filter = ("endpoint_name",)
    readonly_fields = ("worker", "endpoint_name", "instance_type", "last_seen")


@admin.register(ColdStart)
class ColdStartAdmin(EsdPermissionsAdmin):
    """Scale-from-zero history: how long queued jobs waited for an endpoint's first worker."""

    view_permissions = ("sagemaker_endpoint:all", "sagemaker_endpoint:list")
    list_display = ("endpoint_name", "seconds", "worker", "queued_at", "started_at")
    list_filter = ("endpoint_name",)
    readonly_fields = ("endpoint_name", "worker", "queued_at", "started_at", "seconds")
