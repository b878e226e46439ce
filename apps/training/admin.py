"""Console pages for datasets (training jobs join them later)."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest

from apps.accounts.admin import SharedResourceAdmin, request_permissions
from apps.training import services
from apps.training.choices import DatasetStatus
from apps.training.models import Dataset, DatasetItem
from esd.storage import blob_store


class ItemInline(admin.TabularInline):
    model = DatasetItem
    fields = ("filename", "name", "type", "status")
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Dataset)
class DatasetAdmin(SharedResourceAdmin):
    bulk_delete = False
    view_permissions = change_permissions = ("train:all",)
    add_permissions = ()  # datasets are uploaded through the API
    list_display = ("name", "status", "prefix", "file_count", "creator", "created")
    list_filter = ("status",)
    search_fields = ("name", "creator", "prefix")
    ordering = ("-created",)
    inlines = [ItemInline]
    actions = ["enable", "disable", "delete_with_files"]
    fields = ("name", "status", "prefix", "location", "creator", "created", "params")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        visible = Dataset.objects.visible_to(request.user, request_permissions(request))
        return visible.annotate(files=Count("items"))

    @admin.display(description="Files", ordering="files")
    def file_count(self, obj: Dataset) -> int:
        return obj.files

    @admin.display(description="Location")
    def location(self, obj: Dataset) -> str:
        return blob_store().uri(obj.folder)

    def _set_status(self, request: HttpRequest, queryset: QuerySet, status: str) -> None:
        for dataset in queryset:
            services.set_status(dataset, status)
        self.message_user(request, f"{queryset.count()} dataset(s) now {status}.", messages.SUCCESS)

    @admin.action(description="Enable selected datasets")
    def enable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_status(request, queryset, DatasetStatus.ENABLED)

    @admin.action(description="Disable selected datasets")
    def disable(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._set_status(request, queryset, DatasetStatus.DISABLED)

    @admin.action(description="Delete selected datasets and their files")
    def delete_with_files(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = services.delete_datasets(queryset)
        self.message_user(request, f"Deleted {count} dataset(s).", messages.SUCCESS)

    def delete_model(self, request: HttpRequest, obj: Dataset) -> None:
        services.delete_datasets([obj])
