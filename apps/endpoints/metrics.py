"""Endpoint metrics for ``/metrics`` (esd.monitoring): what the console's endpoint line shows, per endpoint.

The numbers come from the same functions the console and ``endpoint_status`` use (``describe_for_operators``:
the queue backlog and the scaling hint; ``live_worker_counts``: the heartbeat rule of ``live_workers``), so a
dashboard, an autoscaler reading these gauges and the console can never disagree.

Cost of a scrape: a fixed number of queries (endpoints by status, the live endpoints, live workers grouped by
endpoint, cold starts grouped by endpoint) and one broker call per self-hosted endpoint for its backlog, which no
broker answers for several queues at once.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily

from apps.endpoints.backends.selfhosted import live_worker_counts
from apps.endpoints.models import Endpoint
from apps.endpoints.services import cold_start_stats, describe_for_operators
from esd.monitoring import metrics_collector


@metrics_collector("endpoints")
def endpoint_metrics() -> Iterable[Metric]:
    """Four queries whatever the number of endpoints, and one broker call (the backlog) per self-hosted one."""
    by_status = GaugeMetricFamily("esd_endpoints", "Live endpoints by backend and status", labels=["backend", "status"])
    for row in Endpoint.objects.live().values("backend", "status").annotate(n=Count("id")).order_by():
        by_status.add_metric([row["backend"], row["status"]], row["n"])
    backlog = GaugeMetricFamily(
        "esd_endpoint_backlog",
        "Jobs waiting in a self-hosted endpoint's queue (not yet taken by a worker)",
        labels=["endpoint"],
    )
    live = GaugeMetricFamily(
        "esd_endpoint_workers_live",
        "Workers serving an endpoint: self-hosted workers heard from within ESD_WORKER_HEARTBEAT_TTL, or the "
        "instances SageMaker last reported",
        labels=["endpoint", "backend"],
    )
    desired = GaugeMetricFamily(
        "esd_endpoint_workers_desired",
        "Workers a self-hosted endpoint should run: the console's scaling hint, clamp(ceil(backlog / 3), min, max) "
        "with autoscaling, else its initial count",
        labels=["endpoint"],
    )
    workers = live_worker_counts()
    for endpoint in Endpoint.objects.live().order_by("name"):
        line = describe_for_operators(endpoint)
        if endpoint.backend == "self-hosted":
            live.add_metric([endpoint.name, endpoint.backend], workers.get(endpoint.name, 0))
            if line["backlog"] is not None:
                backlog.add_metric([endpoint.name], line["backlog"])
            desired.add_metric([endpoint.name], line["desired"])
        else:
            live.add_metric([endpoint.name, endpoint.backend], line["instances"])
    cold = SummaryMetricFamily(
        "esd_endpoint_cold_start_seconds",
        "From the first job waiting with no live worker to the first worker's heartbeat (scale from zero)",
        labels=["endpoint"],
    )
    last_cold = GaugeMetricFamily(
        "esd_endpoint_cold_start_last_seconds", "The endpoint's latest cold start", labels=["endpoint"]
    )
    for name, stat in sorted(cold_start_stats().items()):
        cold.add_metric([name], count_value=stat["count"], sum_value=stat["sum_seconds"])
        last_cold.add_metric([name], stat["last_seconds"])
    return [by_status, backlog, live, desired, cold, last_cold]
