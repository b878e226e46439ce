"""The browser console's shared parts: access by ESD permissions and the navigation (the dashboard, which reads
every app, lives in ``apps.endpoints.dashboard``).

Console pages are plain Django views rendering ``templates/console``; live parts refresh with htmx (served from our
own static files). Each page declares the ESD permissions it needs with ``@console_view``; the navigation shows only
what the user may open, and the server checks again on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.module_loading import import_string

NAV: list[tuple[str, str, tuple[str, ...]]] = [
    # (label, url name, any of these permissions; () = every signed-in user)
    ("Dashboard", "console:dashboard", ()),
    ("Generate", "console:generate", ("inference:all", "inference:create")),
    ("Gallery", "console:gallery", ("inference:all", "inference:list", "inference:create")),
    ("Models", "console:models", ("checkpoint:all", "checkpoint:list")),
    ("Endpoints", "console:endpoints", ("sagemaker_endpoint:all", "sagemaker_endpoint:list")),
    ("Training", "console:trainings", ("train:all",)),
    ("Usage", "console:usage", ()),  # everyone's own GPU-seconds; operators (user:all) everyone's
    ("Users", "console:users", ("user:all", "user:list")),
    ("Roles", "console:roles", ("role:all", "role:list")),
    ("API keys", "console:keys", ()),
    ("Webhooks", "console:webhooks", ()),
]


def permissions(request: HttpRequest) -> frozenset[str]:
    """The signed-in user's ESD permissions, once per request."""
    if not hasattr(request, "_esd_permissions"):
        permissions_of = import_string(settings.ESD_PERMISSIONS_OF)  # the accounts app's rule
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
