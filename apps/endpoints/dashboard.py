"""The console's home page: jobs, endpoints and trainings at a glance, each part shown only to users who may list
it. It reads every app, so it lives in an app (plumbing under ``esd/`` imports none)."""

from __future__ import annotations

from typing import Any

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from apps.endpoints import services as endpoint_services
from apps.endpoints import usage
from apps.endpoints.models import Endpoint
from apps.inference.models import InferenceJob
from apps.training.models import TrainingJob
from esd.console import console_view, holds, permissions


@console_view()
def dashboard(request: HttpRequest) -> HttpResponse:
    return render(request, "console/dashboard.html", dashboard_context(request))


@console_view()
def dashboard_live(request: HttpRequest) -> HttpResponse:
    """The part of the dashboard htmx refreshes every few seconds."""
    return render(request, "console/_dashboard_live.html", dashboard_context(request))


def dashboard_context(request: HttpRequest) -> dict[str, Any]:
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
    if holds(request, "user:all"):
        # users at 80 % of a role quota or more (apps.endpoints.usage), in a fixed number of queries
        context["quota_use"] = usage.quota_use()
    return context
