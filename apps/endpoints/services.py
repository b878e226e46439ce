"""Endpoint operations (contract §9.6, §10.2, §12). The API, the console, commands and actors call these."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.dispatch import Signal
from django.utils import timezone

from apps.endpoints import scaling
from apps.endpoints.backends import get_backend
from apps.endpoints.backends.base import BackendError, RemoteStatus
from apps.endpoints.backends.selfhosted import live_workers
from apps.endpoints.choices import EndpointStatus, EndpointType
from apps.endpoints.lifecycle import ENABLE_AUTOSCALING, FAIL_JOBS, MARK_READY, Current, Outcome, transition
from apps.endpoints.models import ColdStart, Endpoint, EndpointOwner
from esd.api.errors import BadRequest
from esd.owners import save_owners
from esd.tasks import queue_backlog

log = logging.getLogger(__name__)

# Sent when an endpoint is deleted or vanished: receivers fail its in-progress jobs (the inference app).
endpoint_removed = Signal()


@dataclass(frozen=True)
class EndpointRequest:
    """A validated ``POST /endpoints`` (counts already whole numbers)."""

    endpoint_type: str
    instance_type: str
    initial_instance_count: int
    autoscaling: bool
    roles: list[str]
    name: str = ""
    min_instance_number: int = 0
    max_instance_number: int = 1
    custom_docker_image_uri: str = ""
    custom_extensions: str = ""
    backend: str = ""


def parse_quotas(text: str) -> dict[str, int]:
    """``"ml.g4dn.16xlarge=0,*=16"`` -> ``{"ml.g4dn.16xlarge": 0, "*": 16}``; malformed entries are ignored."""
    quotas: dict[str, int] = {}
    for entry in text.split(","):
        name, _, value = entry.strip().partition("=")
        if name and value.strip().isdigit():
            quotas[name.strip()] = int(value)
    return quotas


def normalise_extensions(text: str) -> list[str]:
    return list(dict.fromkeys(part for part in text.replace(",", " ").split() if part))


def create_endpoint(request: EndpointRequest, *, creator: str) -> Endpoint:
    """Validate in the contract's order, record the endpoint, provision it, start its monitor."""
    from esd.tasks import enqueue

    backend_name = request.backend or settings.ESD_DEFAULT_ENDPOINT_BACKEND
    if request.custom_extensions and request.custom_docker_image_uri:
        raise BadRequest("custom_extensions and custom_docker_image_uri cannot be used together")
    if request.endpoint_type == "Serverless":
        raise BadRequest("Serverless endpoint is not supported yet")
    backend = get_backend(backend_name)
    if not backend.configured():
        raise BadRequest(f"backend {backend_name} is not configured")
    if request.custom_docker_image_uri and backend_name == "self-hosted":
        raise BadRequest("custom_docker_image_uri is not supported by self-hosted endpoints")

    endpoint_id = uuid.uuid4()
    short = request.name or str(endpoint_id)[:7]
    kind = "real-time" if request.endpoint_type == EndpointType.REAL_TIME else "async"
    name = f"esd-{kind}-{short}"
    if request.autoscaling:
        if request.endpoint_type == EndpointType.REAL_TIME and request.min_instance_number < 1:
            raise BadRequest(f"min_instance_number should be at least 1 for real-time endpoint: {request.name}")
        if request.max_instance_number < request.min_instance_number:
            raise BadRequest(f"max_instance_number should be at least min_instance_number: {name}")
    extensions = normalise_extensions(request.custom_extensions)
    if len(extensions) > 3:
        raise BadRequest("custom_extensions should be at most 3")

    live = Endpoint.objects.live()
    if settings.ESD_ONE_ENDPOINT_PER_ROLE:
        taken = set(
            EndpointOwner.objects.filter(resource__in=live, name__in=request.roles).values_list("name", flat=True)
        )
        clash = next((role for role in request.roles if role in taken), None)
        if clash is not None:
            raise BadRequest(f"role [{clash}] has a valid endpoint already, not allow to have another one")
    model_name = f"esd-model-{kind}-{short}"
    if live.filter(name=name).exists():
        raise BadRequest(f'Cannot create already existing model "{model_name}": endpoint {name} already exists')

    endpoint = Endpoint(
        id=endpoint_id,
        name=name,
        endpoint_type=request.endpoint_type,
        backend=backend_name,
        instance_type=request.instance_type,
        initial_instance_count=request.initial_instance_count,
        min_instance_number=request.min_instance_number,
        max_instance_number=request.max_instance_number,
        autoscaling=request.autoscaling,
        custom_extensions=",".join(extensions),
        custom_docker_image_uri=request.custom_docker_image_uri,
        creator=creator,
    )
    check_quota(endpoint)
    try:
        with transaction.atomic():
            endpoint.save()
            save_owners(EndpointOwner, endpoint, request.roles)
    except IntegrityError:  # a concurrent request took the name first
        raise BadRequest(
            f'Cannot create already existing model "{model_name}": endpoint {name} already exists'
        ) from None
    try:
        backend.provision(endpoint)
    except BaseException as exc:
        endpoint.delete()
        if isinstance(exc, BackendError):
            raise BadRequest(exc.message) from exc
        raise
    enqueue("apps.endpoints.tasks.reconcile_endpoint", str(endpoint.id))
    return endpoint


def check_quota(endpoint: Endpoint) -> None:
    """Contract §9.6 step 8a: instances per instance type across live endpoints, before anything is provisioned."""
    quotas = parse_quotas(settings.ESD_INSTANCE_QUOTAS)
    quota = quotas.get(endpoint.instance_type, quotas.get("*", 16))
    used = sum(e.capacity for e in Endpoint.objects.live().filter(instance_type=endpoint.instance_type))
    delta = endpoint.capacity
    if used + delta > quota:
        raise BadRequest(
            "An error occurred (ResourceLimitExceeded) when calling the CreateEndpoint operation: The account-level "
            f"service limit '{endpoint.instance_type} for endpoint usage' is {quota} Instances, with current "
            f"utilization of {used} Instances and a request delta of {delta} Instances. Please use AWS Service "
            "Quotas to request an increase for this quota."
        )


def delete_endpoints(endpoints: list[Endpoint]) -> int:
    """Tear down (remote calls in the request; gone is fine), fail in-progress jobs, delete the rows."""
    for endpoint in endpoints:
        get_backend(endpoint.backend).teardown(endpoint)
        endpoint_removed.send(sender=Endpoint, endpoint=endpoint)
        endpoint.delete()
    return len(endpoints)


# --- the lifecycle ---------------------------------------------------------------------------------------------------


def reconcile(endpoint_id: str) -> Endpoint | None:
    """Ask the backend, apply ``transition`` and run its effects. Returns the endpoint (None: gone from the db).

    Runs under a row lock taken with ``skip_locked``, so concurrent reconcilers of one endpoint do not race: the
    second simply skips this round.
    """
    with transaction.atomic():
        endpoint = Endpoint.objects.select_for_update(skip_locked=True).filter(pk=endpoint_id).first()
        if endpoint is None or endpoint.status == EndpointStatus.DELETED:
            return endpoint
        try:
            remote = get_backend(endpoint.backend).describe(endpoint)
        except BackendError as exc:
            remote = RemoteStatus("Failed", 0, exc.message)
        outcome = transition(Current(endpoint.status, endpoint.end_time is not None, endpoint.autoscaling), remote)
        apply_outcome(endpoint, outcome)
        if endpoint.backend == "self-hosted" and outcome.instances == 0 and endpoint.waiting_since is None:
            _start_cold_start_clock_if_queued(endpoint)
    for effect in outcome.effects:
        run_effect(endpoint, effect)
    return endpoint


def apply_outcome(endpoint: Endpoint, outcome: Outcome) -> None:
    """The one place an endpoint's status changes."""
    if outcome.status != endpoint.status:
        log.info("endpoint %s: %s -> %s", endpoint.name, endpoint.status, outcome.status)
    endpoint.status = outcome.status
    endpoint.current_instance_count = outcome.instances
    if outcome.error is not None:
        endpoint.error = outcome.error
    if MARK_READY in outcome.effects:
        endpoint.end_time = timezone.now()
    endpoint.checked_at = timezone.now()
    endpoint.save(update_fields=["status", "current_instance_count", "error", "end_time", "checked_at"])


def run_effect(endpoint: Endpoint, effect: str) -> None:
    if effect == ENABLE_AUTOSCALING and not endpoint.autoscaling_applied:
        get_backend(endpoint.backend).enable_autoscaling(endpoint)
        Endpoint.objects.filter(pk=endpoint.pk).update(autoscaling_applied=True)
        endpoint.autoscaling_applied = True
    elif effect == FAIL_JOBS:
        endpoint_removed.send(sender=Endpoint, endpoint=endpoint)


# --- self-hosted workers ---------------------------------------------------------------------------------------------


def scaling_hint(endpoint: Endpoint, backlog: int | None = None) -> int:
    """Workers a self-hosted endpoint should run (contract §12.2): clamp(ceil(backlog / 3), min, max) with
    autoscaling, else its initial count. ``apps.endpoints.scaling`` holds the rule; the rendered KEDA objects
    (``apps.endpoints.k8s``) use the same one."""
    if backlog is None:
        backlog = queue_backlog(endpoint.queue_name) or 0
    return scaling.desired_workers(endpoint, backlog)


def describe_for_operators(endpoint: Endpoint) -> dict[str, Any]:
    """The status line ``endpoint_status`` and the console show."""
    backlog = queue_backlog(endpoint.queue_name) if endpoint.backend == "self-hosted" else None
    return {
        "name": endpoint.name,
        "backend": endpoint.backend,
        "type": endpoint.endpoint_type,
        "status": endpoint.status,
        "instances": endpoint.current_instance_count,
        "backlog": backlog,
        "desired": scaling_hint(endpoint, backlog) if endpoint.backend == "self-hosted" else None,
        "error": endpoint.error,
    }


# --- scale from zero: the cold-start clock ---------------------------------------------------------------------------


def note_queued(endpoint: Endpoint) -> None:
    """A job was queued for a self-hosted endpoint: with no live worker, start the cold-start clock (kept if it is
    already running). The inference app calls this when it sends a job to the endpoint's queue."""
    if endpoint.backend == "self-hosted" and live_workers(endpoint.name) == 0:
        Endpoint.objects.filter(pk=endpoint.pk, waiting_since__isnull=True).update(waiting_since=timezone.now())


def _start_cold_start_clock_if_queued(endpoint: Endpoint) -> None:
    """The sweep's view: no worker and jobs waiting (queued by another process, or left when the workers died)."""
    if (queue_backlog(endpoint.queue_name) or 0) > 0:
        now = timezone.now()
        if Endpoint.objects.filter(pk=endpoint.pk, waiting_since__isnull=True).update(waiting_since=now):
            endpoint.waiting_since = now


def record_cold_start(endpoint_name: str, worker: str) -> ColdStart | None:
    """A worker heartbeat: if the endpoint's jobs were waiting for a worker, this is the end of its cold start.

    The clock is cleared with a conditional update, so of concurrent first heartbeats exactly one records it.
    """
    endpoint = (
        Endpoint.objects.live()
        .filter(name=endpoint_name, backend="self-hosted", waiting_since__isnull=False)
        .only("pk", "waiting_since")
        .first()
    )
    if endpoint is None:
        return None
    since = endpoint.waiting_since
    if not Endpoint.objects.filter(pk=endpoint.pk, waiting_since=since).update(waiting_since=None):
        return None
    now = timezone.now()
    cold = ColdStart.objects.create(
        endpoint_name=endpoint_name,
        worker=worker[:200],
        queued_at=since,
        started_at=now,
        seconds=max(0.0, (now - since).total_seconds()),
    )
    log.info("endpoint %s: worker %s started %.1f s after jobs were queued", endpoint_name, worker, cold.seconds)
    return cold


def cold_start_stats() -> dict[str, dict[str, float]]:
    """Per endpoint: ``count`` and ``sum_seconds`` of its cold starts and ``last_seconds`` (the metrics export
    these as ``esd_endpoint_cold_start_seconds``), for endpoints that still exist. One query: the latest cold
    start of each group is a correlated subquery, so a scrape costs the same however many endpoints there are."""
    from django.db.models import Count, OuterRef, Subquery, Sum

    live = Endpoint.objects.live().values("name")
    latest = ColdStart.objects.filter(endpoint_name=OuterRef("endpoint_name")).order_by("-started_at", "-pk")
    rows = (
        ColdStart.objects.filter(endpoint_name__in=live)
        .values("endpoint_name")
        .annotate(n=Count("id"), total=Sum("seconds"), last=Subquery(latest.values("seconds")[:1]))
        .order_by()
    )
    return {
        row["endpoint_name"]: {
            "count": row["n"],
            "sum_seconds": row["total"] or 0.0,
            "last_seconds": row["last"] or 0.0,
        }
        for row in rows
    }
