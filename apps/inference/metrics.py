"""Inference metrics for ``/metrics`` (esd.monitoring), computed from the jobs' rows at scrape time.

Three aggregate queries whatever the number of jobs: jobs by endpoint and status; the latency histograms (queue
wait, run, ingest) of finished jobs, every bucket a filtered COUNT in one GROUP BY; GPU-seconds by endpoint (and
user with ``ESD_METRICS_USER_LABELS``). Counts are of the rows that exist: deleting jobs lowers them, which
Prometheus reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.db.models import Count, Q, Sum
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from apps.inference.choices import TERMINAL
from apps.inference.models import InferenceJob
from esd.monitoring import metrics_collector

SLOW = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
HISTOGRAMS = {
    # field -> (metric name, help, buckets)
    "queue_seconds": (
        "esd_inference_job_queue_seconds",
        "Finished jobs: from start (dispatch) to the worker's pickup",
        SLOW,
    ),
    "run_seconds": ("esd_inference_job_run_seconds", "Finished jobs: from the worker's pickup to its result", SLOW),
    "ingest_seconds": (
        "esd_inference_job_ingest_seconds",
        "Finished jobs: from the result's arrival to the job's end (images stored)",
        FAST,
    ),
}


def _histogram_aggregates() -> dict:
    """COUNT, SUM and one filtered COUNT per bucket for every histogram field, as one annotate()."""
    aggregates = {}
    for field, (_, _, buckets) in HISTOGRAMS.items():
        aggregates[f"{field}__n"] = Count(field)
        aggregates[f"{field}__sum"] = Sum(field)
        for index, bound in enumerate(buckets):
            aggregates[f"{field}__b{index}"] = Count("id", filter=Q(**{f"{field}__lte": bound}))
    return aggregates


@metrics_collector("inference")
def inference_metrics() -> Iterable[Metric]:
    jobs = GaugeMetricFamily(
        "esd_inference_jobs", "Inference jobs by endpoint and status", labels=["endpoint", "status"]
    )
    for row in InferenceJob.objects.values("endpoint_name", "status").annotate(n=Count("id")).order_by():
        jobs.add_metric([row["endpoint_name"], row["status"]], row["n"])

    families = {
        field: HistogramMetricFamily(name, text, labels=["endpoint"]) for field, (name, text, _) in HISTOGRAMS.items()
    }
    finished = InferenceJob.objects.filter(status__in=TERMINAL)
    for row in finished.values("endpoint_name").annotate(**_histogram_aggregates()).order_by("endpoint_name"):
        for field, (_, _, buckets) in HISTOGRAMS.items():
            count = row[f"{field}__n"]
            if not count:
                continue
            points = [(floatToGoString(bound), row[f"{field}__b{index}"]) for index, bound in enumerate(buckets)]
            families[field].add_metric(
                [row["endpoint_name"]], [*points, ("+Inf", count)], sum_value=row[f"{field}__sum"] or 0.0
            )

    # The user label is opt-in (ESD_METRICS_USER_LABELS): a series per user grows without bound and shows every
    # user name to whoever scrapes; per-user accounting belongs to usage_report and the console's Usage page.
    by_user = settings.ESD_METRICS_USER_LABELS
    labels = ["endpoint", "user"] if by_user else ["endpoint"]
    gpu = CounterMetricFamily(
        "esd_inference_gpu_seconds",
        f"Worker seconds jobs used (a batched call shared by its images), by {' and '.join(labels)}",
        labels=labels,
    )
    fields = ("endpoint_name", "owner") if by_user else ("endpoint_name",)
    used = InferenceJob.objects.exclude(gpu_seconds=None).values(*fields)
    for row in used.annotate(seconds=Sum("gpu_seconds")).order_by(*fields):
        gpu.add_metric([row[field] for field in fields], row["seconds"] or 0.0)
    return [jobs, *families.values(), gpu]
