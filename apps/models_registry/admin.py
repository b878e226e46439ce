"""Console pages for checkpoints: list with type/status filters and search, detail, bulk actions.

Actions call the same services as the API; access follows the caller's ESD checkpoint permissions.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.accounts.admin import SharedResourceAdmin, request_permissions
from apps.models_registry import services
from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from esd.api.errors import EsdError
from esd.storage import blob_store


class FileInline(admin.TabularInline):
    model = CheckpointFile
    fields = ("position", "name")
    readonly_fields = fields
    extra = 0
    can_delete = False


class OwnerInline(admin.TabularInline):
    model = CheckpointOwner
    fields = ("position", "name")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Checkpoint)
class CheckpointAdmin(SharedResourceAdmin):
    bulk_delete = False
    view_permissions = ("checkpoint:all", "checkpoint:list")
    add_permissions = ()  # uploads start from the API or `manage.py import_checkpoint`
    change_permissions = ("checkpoint:all", "checkpoint:create")
    list_display = ("file_names", "checkpoint_type", "status", "owner_names", "creator", "progress", "created")
    list_filter = ("checkpoint_type", "status")
    search_fields = ("files__name", "creator", "owners__name", "id")
    ordering = ("-created",)
    inlines = [FileInline, OwnerInline]
    actions = ["enable", "disable", "delete_with_files"]
    fields = (
        "id",
        "checkpoint_type",
        "status",
        "location",
        "creator",
        "created",
        "updated",
        "params",
        "source_url",
        "progress",
        "error",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return Checkpoint.objects.visible_to(request.user, request_permissions(request)).prefetch_related(
            "files", "owners"
        )

    def has_change_permission(self, request: HttpRequest, obj: Checkpoint | None = None) -> bool:
        # Enable/disable/delete/share follow the API's rule: checkpoint:all, or the creator with checkpoint:create.
        if not super().has_change_permission(request, obj):
            return False
        return obj is None or request.user.has_perm("models_registry.change_checkpoint", obj)

    has_delete_permission = has_change_permission

    @admin.display(description="Files")
    def file_names(self, obj: Checkpoint) -> str:
        return ", ".join(f.name for f in obj.files.all()) or str(obj.id)

    @admin.display(description="Owners")
    def owner_names(self, obj: Checkpoint) -> str:
        return ", ".join(o.name for o in obj.owners.all()) or "(everyone)"

    @admin.display(description="Location")
    def location(self, obj: Checkpoint) -> str:
        return blob_store().uri(obj.prefix)

    @admin.display(description="Download")
    def progress(self, obj: Checkpoint) -> str:
        if not obj.source_url:
            return "-"
        if obj.bytes_total:
            return f"{obj.bytes_done / obj.bytes_total:.0%} of {obj.bytes_total / 1e6:.1f} MB"
        return f"{obj.bytes_done / 1e6:.1f} MB"

    def _changeable(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset & Checkpoint.objects.changeable_by(request.user, request_permissions(request))

    def _set_status(self, request: HttpRequest, queryset: QuerySet, status: str) -> None:
        changed, refused = 0, []
        for checkpoint in self._changeable(request, queryset):
            try:
                services.change_status(checkpoint, status)
                changed += 1
            except EsdError as exc:
                refused.append(exc.message)
        self.message_user(request, f"{changed} checkpoint(s) now {status}.", messages.SUCCESS)
        for message in refused:
            self.message_user(request, message, messages.WARNING)

    @admin.action(description="Enable selected checkpoints")
    def enable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_status(request, queryset, CheckpointStatus.ACTIVE)

    @admin.action(description="Disable selected checkpoints")
    def disable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_status(request, queryset, CheckpointStatus.DISABLED)

    @admin.action(description="Delete selected checkpoints and their files")
    def delete_with_files(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = services.delete_checkpoints(self._changeable(request, queryset))
        self.message_user(request, f"Deleted {count} checkpoint(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Checkpoint) -> None:
        services.delete_checkpoints([obj])
