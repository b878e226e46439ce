"""Endpoint actors: the per-endpoint monitor, the periodic sweep, and worker heartbeats."""

from __future__ import annotations

import logging
from datetime import timedelta

import dramatiq
from django.conf import settings
from django.utils import timezone

from apps.endpoints import services
from apps.endpoints.choices import Backend
from apps.endpoints.lifecycle import SETTLING
from apps.endpoints.models import Endpoint, Worker
from esd.tasks import handles, periodic, recoverer

log = logging.getLogger(__name__)

FIRST_DELAY_MS = 15_000
MAX_DELAY_MS = 300_000


@dramatiq.actor(max_retries=3, min_backoff=1_000, max_backoff=60_000, time_limit=120_000)
def reconcile_endpoint(endpoint_id: str, delay_ms: int = FIRST_DELAY_MS) -> None:
    """Poll one endpoint; while it is settling (Creating, Updating, ...) poll again with back-off, 15 s to 5 min."""
    endpoint = services.reconcile(endpoint_id)
    if endpoint is not None and endpoint.status in SETTLING:
        reconcile_endpoint.send_with_options(args=(endpoint_id, min(delay_ms * 2, MAX_DELAY_MS)), delay=delay_ms)


def sweep_interval() -> int:
    # Self-hosted counts must drop soon after heartbeats stop: sweep at least once per heartbeat TTL.
    return min(settings.ESD_ENDPOINT_SWEEP_SECONDS, settings.ESD_WORKER_HEARTBEAT_TTL)


@periodic(sweep_interval)
def sweep_endpoints() -> None:
    """Re-check every live endpoint: self-hosted ones each run, SageMaker ones every ESD_ENDPOINT_SWEEP_SECONDS."""
    stale = timezone.now() - timedelta(seconds=settings.ESD_ENDPOINT_SWEEP_SECONDS)
    for endpoint in Endpoint.objects.live().only("id", "backend", "checked_at"):
        if endpoint.backend == Backend.SELF_HOSTED or endpoint.checked_at is None or endpoint.checked_at < stale:
            try:
                services.reconcile(str(endpoint.id))
            except Exception:
                log.exception("sweep could not reconcile endpoint %s", endpoint.id)


@handles("heartbeat")
def heartbeat(event: dict) -> None:
    """A worker is alive: record it, and bring its endpoint up to date at once (InService on the first one)."""
    name, worker = event.get("endpoint"), event.get("worker")
    if not isinstance(name, str) or not isinstance(worker, str) or not name or not worker:
        log.warning("ignoring malformed heartbeat %r", event)
        return
    Worker.objects.update_or_create(
        endpoint_name=name,
        worker=worker[:200],
        defaults={
            "last_seen": timezone.now(),
            "instance_type": str(event.get("instance_type") or "")[:100],
            "capabilities": event.get("capabilities") if isinstance(event.get("capabilities"), dict) else {},
        },
    )
    services.record_cold_start(name, worker)
    endpoint = Endpoint.objects.live().filter(name=name, backend=Backend.SELF_HOSTED).first()
    if endpoint is not None:
        services.reconcile(str(endpoint.id))


@recoverer("endpoint monitors")
def recover_monitors() -> int:
    """Restart the monitors of settling endpoints (their delayed messages died with an in-process broker)."""
    settling = list(Endpoint.objects.filter(status__in=SETTLING).values_list("pk", flat=True))
    for endpoint_id in settling:
        reconcile_endpoint.send(str(endpoint_id))
    return len(settling)
