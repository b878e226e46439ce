"""Console pages for inference jobs: a filtered list, and a detail page with the images and the job's progress."""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from apps.accounts.admin import EsdPermissionsAdmin, request_permissions
from apps.inference import services
from apps.inference.models import InferenceJob
from esd import keys
from esd.storage import blob_store


@admin.register(InferenceJob)
class InferenceJobAdmin(EsdPermissionsAdmin):
    bulk_delete = False
    view_permissions = ("inference:all", "inference:list", "inference:create")
    add_permissions = ()  # jobs are created through the API (or the console's generate page)
    change_permissions = ("inference:all", "inference:create")
    list_display = ("id", "status", "task_type", "inference_type", "endpoint_name", "owner", "progress", "create_time")
    list_filter = ("status", "task_type", "inference_type", "backend")
    search_fields = ("id", "owner", "endpoint_name")
    ordering = ("-create_time",)
    actions = ["delete_jobs"]
    fields = (
        "id",
        "status",
        "task_type",
        "inference_type",
        "owner",
        "endpoint_name",
        "backend",
        "instance_type",
        "create_time",
        "start_time",
        "complete_time",
        "progress",
        "runtime_seconds",
        "queue_seconds",
        "run_seconds",
        "ingest_seconds",
        "gpu_seconds",
        "images",
        "sagemaker_raw",
        "used_models",
        "payload_string",
        "output_location",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return InferenceJob.objects.visible_to(request.user, request_permissions(request))

    @admin.display(description="Progress")
    def progress(self, obj: InferenceJob) -> str:
        if obj.status == "inprogress" and obj.progress_steps:
            return f"step {obj.progress_step} of {obj.progress_steps}"
        return "-"

    @admin.display(description="Images")
    def images(self, obj: InferenceJob) -> str:
        """Thumbnails of the results (presigned URLs, shown small; click for the full image)."""
        store = blob_store()
        urls = [
            store.presign_get(f"{keys.result_prefix(str(obj.id))}/{name}", settings.ESD_PRESIGN_EXPIRES)
            for name in obj.image_names
        ]
        if not urls:
            return "-"
        return format_html_join(
            " ",
            '<a href="{0}" target="_blank"><img src="{0}" style="max-width:160px;max-height:160px"></a>',
            ((url,) for url in urls),
        ) or format_html("-")

    @admin.action(description="Delete selected jobs with their results")
    def delete_jobs(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = services.delete_jobs(list(queryset))
        self.message_user(request, f"Deleted {count} job(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: InferenceJob) -> None:
        services.delete_jobs([obj])
