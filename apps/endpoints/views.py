"""Console pages for endpoints (the browser side of contract §9.6).

Deploying and deleting go through ``apps.endpoints.services`` like the API, so every rule (one endpoint per role,
names, quotas, backend checks) holds here too and its 400 message appears in the form. The table refreshes itself
with htmx, so a new endpoint's status moves from Creating to InService without a reload.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from botocore.exceptions import ClientError
from django import forms
from django.conf import settings
from django.contrib import messages
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods

from apps.accounts.models import Role, held_role_names, quota_of
from apps.endpoints import services, usage
from apps.endpoints.api.schemas import CREATE, NAME_PATTERN
from apps.endpoints.backends import get_backend
from apps.endpoints.backends.base import BackendError
from apps.endpoints.choices import Backend, EndpointType
from apps.endpoints.models import Endpoint, EndpointOwner, EndpointQuerySet, Worker
from esd.api.errors import EsdError
from esd.console import console_view, holds, permissions

log = logging.getLogger(__name__)

VIEW = ("sagemaker_endpoint:all", "sagemaker_endpoint:list")
CHANGE = ("sagemaker_endpoint:all", "sagemaker_endpoint:create")
SHOWN = 200  # newest endpoints the table lists (instance quotas keep the live ones far fewer)
FIELDS = CREATE["properties"]


def configured_backends() -> list[str]:
    """Only backends this deployment can use: offering another would just earn "backend … is not configured"."""
    return [b.value for b in Backend if get_backend(b.value).configured()]


class DeployForm(forms.Form):
    """``POST /endpoints`` as a form: field names as the API's, limits read from its schema."""

    endpoint_name = forms.CharField(required=False, max_length=FIELDS["endpoint_name"]["maxLength"])
    endpoint_type = forms.ChoiceField(choices=EndpointType.choices, initial=EndpointType.ASYNC)
    backend = forms.ChoiceField(choices=())
    instance_type = forms.CharField(max_length=Endpoint._meta.get_field("instance_type").max_length)
    initial_instance_count = forms.IntegerField(min_value=FIELDS["initial_instance_count"]["minimum"], initial=1)
    autoscaling_enabled = forms.BooleanField(required=False)
    min_instance_number = forms.IntegerField(
        required=False, min_value=FIELDS["min_instance_number"]["minimum"], initial=0
    )
    max_instance_number = forms.IntegerField(
        required=False, min_value=FIELDS["max_instance_number"]["minimum"], initial=1
    )
    assign_to_roles = forms.MultipleChoiceField(choices=())
    custom_extensions = forms.CharField(required=False, widget=forms.Textarea)
    custom_docker_image_uri = forms.CharField(
        required=False, max_length=Endpoint._meta.get_field("custom_docker_image_uri").max_length
    )

    def __init__(self, *args: Any, roles: list[str], backends: list[str], **kwargs: Any) -> None:
        """Choices depend on the database and the deployment, so they are set per request."""
        super().__init__(*args, **kwargs)
        self.fields["assign_to_roles"].choices = [(r, r) for r in roles]
        self.fields["backend"].choices = [(b, b) for b in backends]

    def clean_endpoint_name(self) -> str:
        """The API's short-name pattern, unless empty (then the service generates one)."""
        name = self.cleaned_data["endpoint_name"].strip()
        if name and not re.fullmatch(NAME_PATTERN, name):
            raise forms.ValidationError("letters and digits, single words joined by hyphens (e.g. sdxl-prod)")
        return name

    def clean_assign_to_roles(self) -> list[str]:
        """The API's limit on owner roles."""
        roles = self.cleaned_data["assign_to_roles"]
        most = FIELDS["assign_to_roles"]["maxItems"]
        if len(roles) > most:
            raise forms.ValidationError(f"choose at most {most} roles")
        return roles

    def to_request(self) -> services.EndpointRequest:
        """The same request object the API builds, so the service sees no difference between the two."""
        data = self.cleaned_data
        minimum, maximum = data["min_instance_number"], data["max_instance_number"]
        return services.EndpointRequest(
            endpoint_type=data["endpoint_type"],
            instance_type=data["instance_type"].strip(),
            initial_instance_count=data["initial_instance_count"],
            autoscaling=data["autoscaling_enabled"],
            roles=list(dict.fromkeys(data["assign_to_roles"])),
            name=data["endpoint_name"],
            min_instance_number=0 if minimum is None else minimum,
            max_instance_number=1 if maximum is None else maximum,
            custom_docker_image_uri=data["custom_docker_image_uri"].strip(),
            custom_extensions=data["custom_extensions"],
            backend=data["backend"],
        )


def deploy_form(request: HttpRequest, data: Any = None) -> DeployForm:
    """Roles: every existing role (an endpoint may serve any of them), the user's own selected at first."""
    backends = configured_backends()
    default_backend = settings.ESD_DEFAULT_ENDPOINT_BACKEND
    initial = {
        "assign_to_roles": held_role_names(request.user),
        "backend": default_backend if default_backend in backends else (backends[0] if backends else ""),
    }
    roles = list(Role.objects.order_by("name").values_list("name", flat=True))
    return DeployForm(data, initial=initial, roles=roles, backends=backends)


def visible(request: HttpRequest) -> EndpointQuerySet:
    """What this user may see, by the model's own rule (contract §4.2)."""
    return Endpoint.objects.visible_to(request.user, permissions(request))


def table_context(request: HttpRequest) -> dict[str, Any]:
    """The rows, each with its operator line (backlog and desired workers for self-hosted) and delete right."""
    endpoints = list(
        visible(request)
        .order_by("-start_time", "-id")
        .prefetch_related(Prefetch("owners", queryset=EndpointOwner.objects.order_by("position")))[:SHOWN]
    )
    can_change = holds(request, *CHANGE)
    allowed: set = set()
    if can_change and endpoints:
        changeable = Endpoint.objects.changeable_by(request.user, permissions(request))
        allowed = set(changeable.filter(pk__in=[e.pk for e in endpoints]).values_list("pk", flat=True))
    capabilities = worker_capabilities([e.name for e in endpoints])
    rows = [
        {
            "endpoint": e,
            "capabilities": capabilities.get(e.name, []),
            "info": services.describe_for_operators(e),
            "owners": [o.name for o in e.owners.all()],
            "changeable": e.pk in allowed,
        }
        for e in endpoints
    ]
    return {"rows": rows, "can_change": can_change, "shown": SHOWN}


def worker_capabilities(names: list[str]) -> dict[str, list[dict]]:
    """Endpoint name -> the distinct capability summaries its live workers reported (one query for the page)."""
    cutoff = timezone.now() - timedelta(seconds=settings.ESD_WORKER_HEARTBEAT_TTL)
    found: dict[str, dict[str, dict]] = {}
    workers = Worker.objects.filter(endpoint_name__in=names, last_seen__gte=cutoff).values_list(
        "endpoint_name", "capabilities"
    )
    for name, summary in workers:
        if summary and summary.get("digest"):
            found.setdefault(name, {})[summary["digest"]] = summary
    return {name: list(by_digest.values()) for name, by_digest in found.items()}


def page(request: HttpRequest, form: DeployForm | None, status: int = 200) -> HttpResponse:
    """The full page; a refused deploy re-renders it with the form as typed and a 400."""
    context = {**table_context(request), "form": form}
    return render(request, "console/endpoints/list.html", context, status=status)


@console_view(*VIEW)
@require_http_methods(["GET", "POST"])
def endpoints_page(request: HttpRequest) -> HttpResponse:
    """GET: the table and, for deployers, the form. POST: deploy, then back to the table where it shows up."""
    can_change = holds(request, *CHANGE)
    if request.method == "GET":
        return page(request, deploy_form(request) if can_change else None)
    if not can_change:
        return render(request, "console/forbidden.html", {"needed": CHANGE}, status=403)
    form = deploy_form(request, request.POST)
    if form.is_valid():
        try:
            endpoint = services.create_endpoint(form.to_request(), creator=request.user.username)
        except EsdError as exc:
            form.add_error(None, exc.message)
        else:
            messages.success(request, f"Endpoint deployment started: {endpoint.name}")
            return redirect("console:endpoints")
    return page(request, form, status=400)


@console_view(*VIEW)
@require_GET
def endpoints_live(request: HttpRequest) -> HttpResponse:
    """The table alone, which htmx fetches every few seconds."""
    return render(request, "console/endpoints/_table.html", table_context(request))


@console_view(*CHANGE)
@require_http_methods(["GET", "POST"])
def endpoint_delete(request: HttpRequest, pk: str) -> HttpResponse:
    """GET asks for confirmation (teardown cannot be undone, its waiting jobs fail); POST deletes."""
    endpoint = get_object_or_404(Endpoint.objects.changeable_by(request.user, permissions(request)), pk=pk)
    if request.method == "GET":
        return render(request, "console/endpoints/confirm_delete.html", {"endpoint": endpoint})
    try:
        services.delete_endpoints([endpoint])
    except (EsdError, BackendError) as exc:
        messages.error(request, exc.message)
    except ClientError as exc:  # a remote refusal during teardown: say so on the page; a retry is safe
        log.exception("teardown of endpoint %s failed", endpoint.name)
        messages.error(request, f"could not tear {endpoint.name} down: {exc}")
    else:
        messages.success(request, f"Deleted {endpoint.name}.")
    return redirect("console:endpoints")


# --- usage (GPU-seconds accounting, apps.endpoints.usage) -----------------------------------------------------------

# Usage shows who ran what: everyone's for those who may see every user (user:all), one's own for everybody else.
USAGE_OPERATORS = ("user:all",)
USAGE_DEFAULT_DAYS = 14
USAGE_MAX_DAYS = 366


class UsageForm(forms.Form):
    """The usage page's filters (GET): a period of server days, a grouping, and for operators one user."""

    since = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    by = forms.ChoiceField(choices=[(g, g) for g in usage.GROUPINGS], required=False)
    user = forms.CharField(required=False, max_length=150)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        until = data.get("until") or usage.today()
        since = data.get("since") or until - timedelta(days=USAGE_DEFAULT_DAYS - 1)
        if until < since:
            raise forms.ValidationError("The period ends before it starts.")
        if (until - since).days >= USAGE_MAX_DAYS:
            raise forms.ValidationError(f"At most {USAGE_MAX_DAYS} days at once (the report command has no limit).")
        data["since"], data["until"] = since, until
        return data


@console_view()
def usage_page(request: HttpRequest) -> HttpResponse:
    """GPU-seconds by user, role, endpoint or day with a per-day stacked bar chart; ``?format=csv`` downloads the
    table (the ``usage_report --csv`` columns). Operators see everyone, other users their own jobs."""
    operator = holds(request, *USAGE_OPERATORS)
    until = usage.today()
    defaults = {"since": until - timedelta(days=USAGE_DEFAULT_DAYS - 1), "until": until}
    defaults["by"] = "user" if operator else "endpoint"
    form = UsageForm({**{k: str(v) for k, v in defaults.items()}, **request.GET.dict()})  # the form shows them
    if not form.is_valid():
        context = {"form": form, "operator": operator, "time_zone": settings.TIME_ZONE}
        return render(request, "console/usage.html", context, status=400)
    data = form.cleaned_data
    by = data["by"] or ("user" if operator else "endpoint")
    owner = (data["user"] or None) if operator else request.user.username
    result = usage.usage(usage.Period(data["since"], data["until"]), by, owner)
    if request.GET.get("format") == "csv":
        response = HttpResponse(result.to_csv(), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="usage-{by}-{data["since"]}-{data["until"]}.csv"'
        return response
    quota = quota_of(request.user)
    mine = None
    if quota.limited:
        name = request.user.username
        mine = usage.QuotaUse(
            name, quota, usage.used_today([name]).get(name, 0.0), usage.running_jobs([name]).get(name, 0)
        )
    context = {
        "form": form,
        "operator": operator,
        "time_zone": settings.TIME_ZONE,
        "result": result,
        "by": by,
        "owner": owner,
        "chart": usage.chart(result),
        "mine": mine,
        "csv_query": urlencode(
            {"since": data["since"], "until": data["until"], "by": by, "user": owner if operator and owner else ""}
            | {"format": "csv"}
        ),
    }
    return render(request, "console/usage.html", context)
