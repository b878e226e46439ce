"""Console pages for checkpoints (the browser side of contract §9.4).

Every change goes through ``apps.models_registry.services``, exactly as the API does, so the console can never
accept what the API would refuse; a service's ``EsdError`` becomes a message on the page, never a 500. Uploads do
not pass through these views at all: ``static/console/upload.js`` sends the parts from the browser straight to the
presigned URLs the API hands out, so a large model never streams through a web worker.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.db.models import Exists, OuterRef, Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from apps.accounts.models import held_role_names
from apps.models_registry import services
from apps.models_registry.api.schemas import STATUSES, TYPES, UPDATE
from apps.models_registry.api.serializers import render_params
from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner, CheckpointQuerySet
from esd.api.errors import EsdError
from esd.console import console_view, holds, permissions
from esd.storage import blob_store

VIEW = ("checkpoint:all", "checkpoint:list")
CHANGE = ("checkpoint:all", "checkpoint:create")
PER_PAGE = 25
# The API's own rule for a new name (``PUT /checkpoints/{id}``), read from its schema so the two cannot drift.
NAME_RULE = UPDATE["properties"]["name"]
URL_MAX = 2048


@dataclass(frozen=True)
class Row:
    """One checkpoint as a list row: what the template shows and which actions this user may take on it."""

    checkpoint: Checkpoint
    names: list[str]
    owners: list[str]
    changeable: bool

    @property
    def label(self) -> str:
        """The file names, or the id when a row has none (a half-created row must still be findable)."""
        return ", ".join(self.names) or str(self.checkpoint.id)

    @property
    def downloading(self) -> bool:
        """A download by URL still running: the row polls for its progress."""
        c = self.checkpoint
        return c.status == CheckpointStatus.INITIAL and bool(c.source_url)

    @property
    def uploading(self) -> bool:
        """A browser upload never completed: the row says so instead of looking merely Initial."""
        return self.checkpoint.status == CheckpointStatus.INITIAL and bool(self.checkpoint.open_uploads)

    @property
    def percent(self) -> int | None:
        """Download progress in whole percent; None when the source did not say how large the file is."""
        c = self.checkpoint
        if not c.bytes_total:
            return None
        return min(100, c.bytes_done * 100 // c.bytes_total)


def visible(request: HttpRequest) -> CheckpointQuerySet:
    """What this user may see, by the model's own rule (contract §4.2), so the page and the API agree."""
    return Checkpoint.objects.visible_to(request.user, permissions(request))


def changeable(request: HttpRequest) -> CheckpointQuerySet:
    """What this user may change or delete: the model's own rule (``checkpoint:all`` or being the creator)."""
    return Checkpoint.objects.changeable_by(request.user, permissions(request))


def with_files_and_owners(queryset: CheckpointQuerySet) -> CheckpointQuerySet:
    """Two prefetch queries per page whatever its length, instead of two per row."""
    return queryset.prefetch_related(
        Prefetch("files", queryset=CheckpointFile.objects.order_by("position")),
        Prefetch("owners", queryset=CheckpointOwner.objects.order_by("position")),
    )


def rows_of(request: HttpRequest, checkpoints: list[Checkpoint]) -> list[Row]:
    """Rows with their action rights; one query settles ``changeable_by`` for the whole page."""
    ids = [c.pk for c in checkpoints]
    allowed: set = set()
    if ids and holds(request, *CHANGE):
        allowed = set(changeable(request).filter(pk__in=ids).values_list("pk", flat=True))
    return [
        Row(
            checkpoint=c,
            names=[f.name for f in c.files.all()],
            owners=[o.name for o in c.owners.all()],
            changeable=c.pk in allowed,
        )
        for c in checkpoints
    ]


def filtered(request: HttpRequest) -> tuple[CheckpointQuerySet, dict[str, str]]:
    """The visible checkpoints narrowed by the ``type``, ``status`` and ``q`` (file name) query parameters."""
    filters = {
        "type": request.GET.get("type", ""),
        "status": request.GET.get("status", ""),
        "q": request.GET.get("q", "").strip(),
    }
    checkpoints = visible(request)
    if filters["type"] in TYPES:
        checkpoints = checkpoints.filter(checkpoint_type=filters["type"])
    if filters["status"] in STATUSES:
        checkpoints = checkpoints.filter(status=filters["status"])
    if filters["q"]:
        # EXISTS rather than a join: a checkpoint with two matching files must stay one row.
        names = CheckpointFile.objects.filter(checkpoint=OuterRef("pk"), name__icontains=filters["q"])
        checkpoints = checkpoints.filter(Exists(names))
    return checkpoints.order_by("-created", "-id"), filters


def list_context(request: HttpRequest, **extra: Any) -> dict[str, Any]:
    """One page of rows with the filters applied; shared by GET and by a refused add-by-URL re-render."""
    checkpoints, filters = filtered(request)
    page: Page = Paginator(with_files_and_owners(checkpoints), PER_PAGE).get_page(request.GET.get("page"))
    return {
        "page": page,
        "rows": rows_of(request, list(page.object_list)),
        "filters": filters,
        "types": TYPES,
        "statuses": STATUSES,
        "can_change": holds(request, *CHANGE),
        # Forms on the page return here; after a POST re-render (add by URL) that is the plain list.
        "back": request.get_full_path() if request.method == "GET" else reverse("console:models"),
        "name_rule": NAME_RULE,
        "url_form": {"url": "", "type": TYPES[0], "error": ""},
        **extra,
    }


def back_to_list(request: HttpRequest) -> HttpResponse:
    """Return to the list page the form was posted from (filters and page kept), never to another site."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}):
        return redirect(target)
    return redirect("console:models")


def current_url(request: HttpRequest) -> str:
    """The page an htmx request came from (its forms post back there), else the list."""
    url = request.headers.get("HX-Current-URL", "")
    if url and url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()}):
        return url
    return reverse("console:models")


def label_of(checkpoint: Checkpoint) -> str:
    """How messages name a checkpoint: its files, as the user knows it."""
    return ", ".join(f.name for f in checkpoint.files.all()) or str(checkpoint.id)


# --- pages -----------------------------------------------------------------------------------------------------------


@console_view(*VIEW)
@require_GET
def models_page(request: HttpRequest) -> HttpResponse:
    """The list with filters, the upload panel and the add-by-URL form."""
    return render(request, "console/models/list.html", list_context(request))


@console_view(*VIEW)
@require_GET
def model_row(request: HttpRequest, pk: str) -> HttpResponse:
    """One row again, for htmx: a download's progress; the row stops polling once it is no longer downloading."""
    checkpoint = get_object_or_404(with_files_and_owners(visible(request)), pk=pk)
    (row,) = rows_of(request, [checkpoint])
    context = {"row": row, "can_change": holds(request, *CHANGE), "back": current_url(request), "name_rule": NAME_RULE}
    return render(request, "console/models/_row.html", context)


@console_view(*VIEW)
@require_GET
def model_detail(request: HttpRequest, pk: str) -> HttpResponse:
    """Everything the list leaves out: location, params as the API renders them, the full error."""
    checkpoint = get_object_or_404(with_files_and_owners(visible(request)), pk=pk)
    (row,) = rows_of(request, [checkpoint])
    context = {
        "row": row,
        "location": blob_store().uri(checkpoint.prefix),
        "params": json.dumps(render_params(checkpoint), indent=2, ensure_ascii=False),
        "can_change": holds(request, *CHANGE),
    }
    return render(request, "console/models/detail.html", context)


# --- actions ---------------------------------------------------------------------------------------------------------


@console_view(*CHANGE)
@require_POST
def add_by_url(request: HttpRequest) -> HttpResponse:
    """``POST /checkpoints`` with ``urls``: the service checks the URL now, a background job downloads it."""
    url = request.POST.get("url", "").strip()
    checkpoint_type = request.POST.get("checkpoint_type", "")
    error = ""
    if not url:
        error = "enter the URL of a model file"
    elif len(url) > URL_MAX:
        error = f"the URL is longer than {URL_MAX} characters"
    elif checkpoint_type not in TYPES:
        error = "choose a model type"
    else:
        try:
            created = services.create_from_urls(
                checkpoint_type=checkpoint_type,
                creator=request.user.username,
                owners=held_role_names(request.user),
                params={},
                urls=[url],
            )
        except EsdError as exc:
            error = exc.message
    if error:
        url_form = {"url": url, "type": checkpoint_type, "error": error}
        return render(request, "console/models/list.html", list_context(request, url_form=url_form), status=400)
    names = ", ".join(label_of(c) for c in created)
    messages.success(request, f"Downloading {names}: the list shows its progress.")
    return back_to_list(request)


@console_view(*CHANGE)
@require_POST
def model_status(request: HttpRequest, pk: str) -> HttpResponse:
    """Enable or disable (``Active`` <-> ``Disabled``); the service refuses every other change."""
    checkpoint = get_object_or_404(changeable(request), pk=pk)
    status = request.POST.get("status", "")
    if status not in STATUSES:
        messages.error(request, f"unknown status {status!r}")
        return back_to_list(request)
    try:
        services.change_status(checkpoint, status)
    except EsdError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{label_of(checkpoint)} is {status}.")
    return back_to_list(request)


def name_problem(name: str) -> str:
    """Why ``name`` breaks the API's rename rule, or "" when it is fine."""
    low, high = NAME_RULE["minLength"], NAME_RULE["maxLength"]
    if not low <= len(name) <= high or not re.fullmatch(NAME_RULE["pattern"], name):
        return (
            f"a new name has {low} to {high} characters: a letter, then letters, digits, _ or - "
            "(no dots: no extension is added)"
        )
    return ""


@console_view(*CHANGE)
@require_POST
def model_rename(request: HttpRequest, pk: str) -> HttpResponse:
    """Rename the first file; the move runs as a background job, so the list shows the new name a bit later."""
    checkpoint = get_object_or_404(changeable(request), pk=pk)
    name = request.POST.get("name", "").strip()
    problem = name_problem(name)
    if problem:
        messages.error(request, problem)
        return back_to_list(request)
    old = label_of(checkpoint)
    try:
        queued = services.request_rename(checkpoint, name)
    except EsdError as exc:
        messages.error(request, exc.message)
    else:
        if queued:
            messages.success(request, f"Renaming {old} to {name}… (a background job; reload in a moment)")
        else:
            messages.info(request, f"No need to update: the name is already {name}.")
    return back_to_list(request)


@console_view(*CHANGE)
@require_http_methods(["GET", "POST"])
def model_delete(request: HttpRequest, pk: str) -> HttpResponse:
    """GET asks for confirmation (deleting removes the files for good); POST deletes."""
    checkpoint = get_object_or_404(with_files_and_owners(changeable(request)), pk=pk)
    label = label_of(checkpoint)
    if request.method == "GET":
        back = request.GET.get("next", "")
        if not url_has_allowed_host_and_scheme(back, allowed_hosts={request.get_host()}):
            back = ""
        context = {"checkpoint": checkpoint, "label": label, "back": back or reverse("console:models")}
        return render(request, "console/models/confirm_delete.html", context)
    services.delete_checkpoints([checkpoint])
    messages.success(request, f"Deleted {label}.")
    return back_to_list(request)
