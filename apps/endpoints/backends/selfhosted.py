"""Self-hosted endpoints: a dramatiq queue named after the endpoint, consumed by ``gpu_runtime`` workers.

Nothing is provisioned remotely: operators (or an orchestrator following the scaling hint, e.g. KEDA with the
objects ``manage.py k8s_manifests`` renders) start workers with ``python -m gpu_runtime worker --endpoint NAME``.
Liveness comes from the workers' heartbeats on the events queue. An endpoint that autoscales from zero serves with
no worker at all (its jobs wait in the queue until the autoscaler starts one), like a SageMaker async endpoint at 0.
"""

from __future__ import annotations

from datetime import timedelta

import dramatiq
from django.conf import settings
from django.db.models import Count
from django.utils import timezone

from apps.endpoints import scaling
from apps.endpoints.backends.base import NO_WORKERS, STARTUP_TIMEOUT, RemoteStatus
from apps.endpoints.choices import EndpointStatus
from apps.endpoints.models import Endpoint, Worker


def _live_since():
    """The heartbeat rule: a worker heard from since then is live (``ESD_WORKER_HEARTBEAT_TTL``)."""
    return timezone.now() - timedelta(seconds=settings.ESD_WORKER_HEARTBEAT_TTL)


def live_workers(endpoint_name: str) -> int:
    """Workers heard from within ``ESD_WORKER_HEARTBEAT_TTL``."""
    return Worker.objects.filter(endpoint_name=endpoint_name, last_seen__gte=_live_since()).count()


def live_worker_counts() -> dict[str, int]:
    """``live_workers`` of every endpoint that has one, in one GROUP BY (the metrics' scrape must not cost a query
    per endpoint); an endpoint missing from the answer has none."""
    rows = Worker.objects.filter(last_seen__gte=_live_since()).values("endpoint_name").annotate(n=Count("id"))
    return {row["endpoint_name"]: row["n"] for row in rows.order_by()}


class SelfHostedBackend:
    """Queues and heartbeats instead of cloud resources."""

    name = "self-hosted"

    def configured(self) -> bool:
        return True

    def provision(self, endpoint: Endpoint) -> None:
        dramatiq.get_broker().declare_queue(endpoint.queue_name)

    def describe(self, endpoint: Endpoint) -> RemoteStatus:
        count = live_workers(endpoint.name)
        if count:
            return RemoteStatus("InService", count)
        if scaling.may_scale_to_zero(endpoint):  # no worker is needed to take jobs: no startup timeout either
            return RemoteStatus("InService", 0)
        timeout = settings.ESD_SELF_HOSTED_STARTUP_TIMEOUT
        if endpoint.status == EndpointStatus.CREATING and timezone.now() - endpoint.start_time > timedelta(
            seconds=timeout
        ):
            return RemoteStatus(STARTUP_TIMEOUT, 0, f"no worker sent a heartbeat within {timeout} s of creation")
        return RemoteStatus(NO_WORKERS)

    def enable_autoscaling(self, endpoint: Endpoint) -> None:
        """Nothing to configure here: the console and ``endpoint_status`` show the scaling hint, and
        ``manage.py k8s_manifests`` renders the KEDA objects that follow it."""

    def teardown(self, endpoint: Endpoint) -> None:
        broker = dramatiq.get_broker()
        broker.declare_queue(endpoint.queue_name)
        broker.flush(endpoint.queue_name)
        Worker.objects.filter(endpoint_name=endpoint.name).delete()


backend = SelfHostedBackend()
