"""Training metrics for ``/metrics`` (esd.monitoring): jobs by status, one GROUP BY per scrape."""

from __future__ import annotations

from collections.abc import Iterable

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily, Metric

from apps.training.models import TrainingJob
from esd.monitoring import metrics_collector


@metrics_collector("training")
def training_metrics() -> Iterable[Metric]:
    jobs = GaugeMetricFamily("esd_training_jobs", "Training jobs by status", labels=["status"])
    for row in TrainingJob.objects.values("status").annotate(n=Count("id")).order_by("status"):
        jobs.add_metric([row["status"]], row["n"])
    return [jobs]
