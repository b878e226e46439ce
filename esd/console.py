"""The browser console's shared parts: access by ESD permissions, the navigation, and the dashboard.

Console pages are plain Django views rendering ``templates/console``; live parts refresh with htmx (served from our
own static files). Each page declares the ESD permissions it needs with ``@console_view``; the navigation shows only
what the user may open, and the server checks again on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

NAV: list[tuple[str, str, tuple[str, ...]]] = [
    # (label, url name, any of these permissions; () = every signed-in user)
    ("Dashboard", "console:dashboard", ()),
    ("Generate", "console:generate", ("inference:all", "inference:create")),
    ("Gallery", "console:gallery", ("inference:all", "inference:list", "inference:create")),
    ("Models", "console:models", ("checkpoint:all", "checkpoint:list")),
    ("Endpoints", "console:endpoints", ("sagemaker_endpoint:all", "sagemaker_endpoint:list")),
    ("Training", "console:trainings", ("train:all",)),
    ("Users", "console:users", ("user:all", "user:list")),
    ("Roles", "console:roles", ("role:all", "role:list")),
    ("API keys", "console:keys", ()),
]


def permissions(request: HttpRequest) -> frozenset[str]:
    """The signed-in user's ESD permissions, once per request."""
    if not hasattr(request, "_esd_permissions"):
        from apps.accounts.models import permissions_of

        user = request.user
        request._esd_permissions = permissions_of(user) if user.is_authenticated and user.is_active else frozenset()
    return request._esd_permissions


def holds(request: HttpRequest, *wanted: str) -> bool:
    return not wanted or not permissions(request).isdisjoint(wanted)


def console_view(*wanted: str) -> Callable:
    """A console page: signed in, and holding any one of ``wanted`` (none listed: any signed-in user)."""

    def decorate(view: Callable) -> Callable:
        @login_required
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not holds(request, *wanted):
                return render(request, "console/forbidden.html", {"needed": wanted}, status=403)
            return view(request, *args, **kwargs)

        return wrapper

    return decorate


def navigation(request: HttpRequest) -> dict[str, Any]:
    """Context processor: the menu entries this user may open, and their permissions for templates."""
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    return {
        "nav": [(label, name) for label, name, wanted in NAV if holds(request, *wanted)],
        "esd_permissions": permissions(request),
    }


@console_view()
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "console/dashboard.html", dashboard_context(request))


@console_view()
def dashboard_live(request: HttpRequest) -> HttpResponse:
    """The part of the dashboard htmx refreshes every few seconds."""
    return render(request, "console/_dashboard_live.html", dashboard_context(request))


def dashboard_context(request: HttpRequest) -> dict[str, Any]:
    from apps.endpoints import services as endpoint_services
    from apps.endpoints.models import Endpoint
    from apps.inference.models import InferenceJob
    from apps.training.models import TrainingJob

    user, perms = request.user, permissions(request)
    context: dict[str, Any] = {}
    if holds(request, "inference:all", "inference:list", "inference:create"):
        jobs = InferenceJob.objects.visible_to(user, perms)
        counts = dict(jobs.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
        context["job_counts"] = [(s, counts.get(s, 0)) for s in ("created", "inprogress", "succeed", "failed")]
        context["failed_jobs"] = list(jobs.filter(status="failed").order_by("-complete_time")[:5])
    if holds(request, "sagemaker_endpoint:all", "sagemaker_endpoint:list"):
        endpoints = Endpoint.objects.visible_to(user, perms).live().order_by("name")[:50]
        context["endpoints"] = [endpoint_services.describe_for_operators(e) for e in endpoints]
    if holds(request, "train:all"):
        trainings = TrainingJob.objects.visible_to(user, perms)
        context["running_trainings"] = list(
            trainings.exclude(status__in=("Completed", "Failed", "Stopped")).order_by("-created")[:5]
        )
        context["failed_trainings"] = list(trainings.filter(status="Failed").order_by("-finished")[:5])
    return context
