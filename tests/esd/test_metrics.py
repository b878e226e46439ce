"""``/metrics`` of the web process: who may read it, and that its numbers follow real work - a job queued on a
self-hosted endpoint, run by a real gpu_runtime worker on the tiny model, and finished - through the real broker
(Redis in CI, the in-process broker locally)."""

import json
import logging
import time
import uuid
from datetime import timedelta

import pytest
import requests
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.endpoints.models import ColdStart, Endpoint, Worker
from apps.inference.models import InferenceJob
from apps.training.models import TrainingJob
from esd import monitoring
from tests.conftest import endpoint_body, wait_until

MODELS = {"Stable-diffusion": ["tiny.safetensors"], "VAE": ["Automatic"]}
PARAMS = {"prompt": "a cat", "seed": 3, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "batch_size": 2}


def scrape(client, **extra) -> dict[tuple[str, frozenset], float]:
    answer = client.get("/metrics", **extra)
    assert answer.status_code == 200, answer.content
    assert answer["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.content.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# --- protection ------------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_without_a_token_only_internal_addresses_are_served(client, settings):
    settings.ESD_METRICS_TOKEN = ""
    for address in ("127.0.0.1", "10.2.3.4", "192.168.1.9", "::1"):
        assert client.get("/metrics", REMOTE_ADDR=address).status_code == 200, address
    refused = client.get("/metrics", REMOTE_ADDR="8.8.8.8")
    assert refused.status_code == 403
    assert refused.json() == {
        "statusCode": 403,
        "message": "metrics are served to internal addresses only without ESD_METRICS_TOKEN, not 8.8.8.8",
    }
    # a reverse proxy on the same host would make every client look local: forwarded requests are refused,
    # whichever header the proxy sets (some set X-Real-IP only, or only Via and X-Forwarded-Proto)
    for header in ("X_FORWARDED_FOR", "X_REAL_IP", "VIA", "X_FORWARDED_HOST", "X_FORWARDED_PROTO", "X_FORWARDED_PORT"):
        refused = client.get("/metrics", REMOTE_ADDR="127.0.0.1", **{f"HTTP_{header}": "8.8.8.8"})
        assert refused.status_code == 403, header
        assert refused.json()["message"].startswith("metrics are not served through a proxy without ESD_METRICS_TOKEN")


@pytest.mark.django_db
def test_a_process_without_a_token_says_so_once_at_startup(settings, monkeypatch, caplog):
    monkeypatch.setattr(monitoring, "_warned_without_token", False)
    settings.DEBUG = False
    settings.ESD_METRICS_TOKEN = ""
    with caplog.at_level(logging.WARNING, logger="esd.monitoring"):
        monitoring.ProbeMiddleware(lambda request: None)
        monitoring.ProbeMiddleware(lambda request: None)  # Django builds the middleware once per handler
    warnings = [record.getMessage() for record in caplog.records if record.name == "esd.monitoring"]
    assert len(warnings) == 1 and "Set ESD_METRICS_TOKEN in production" in warnings[0]

    caplog.clear()
    monkeypatch.setattr(monitoring, "_warned_without_token", False)
    settings.ESD_METRICS_TOKEN = "s3cret-token"
    monitoring.ProbeMiddleware(lambda request: None)
    settings.ESD_METRICS_TOKEN = ""
    settings.DEBUG = True  # a developer's machine: no noise
    monitoring.ProbeMiddleware(lambda request: None)
    assert not [record for record in caplog.records if record.name == "esd.monitoring"]


@pytest.mark.django_db
def test_with_a_token_the_bearer_is_required_from_anywhere(client, settings):
    settings.ESD_METRICS_TOKEN = "s3cret-token"
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["statusCode"] == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Basic s3cret-token").status_code == 401
    ok = client.get("/metrics", REMOTE_ADDR="8.8.8.8", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert ok.status_code == 200
    assert b"esd_scrape_collector_success" in ok.content


# --- values ----------------------------------------------------------------------------------------------------------


def job(endpoint: str, status: str, **fields) -> InferenceJob:
    return InferenceJob.objects.create(
        task_type="txt2img", inference_type="Async", owner=fields.pop("owner", "alice"), endpoint_name=endpoint,
        status=status, **fields,
    )  # fmt: skip


@pytest.mark.django_db
def test_histograms_and_gpu_seconds_come_from_the_rows_in_a_fixed_number_of_queries(client):
    job("ep-a", "succeed", queue_seconds=0.2, run_seconds=3.0, ingest_seconds=0.02, gpu_seconds=1.5)
    with CaptureQueriesContext(connection) as one:
        samples = scrape(client)
    assert value(samples, "esd_inference_job_run_seconds_count", endpoint="ep-a") == 1
    assert value(samples, "esd_inference_job_run_seconds_bucket", endpoint="ep-a", le="2.5") == 0
    assert value(samples, "esd_inference_job_run_seconds_bucket", endpoint="ep-a", le="5.0") == 1
    assert value(samples, "esd_inference_job_run_seconds_sum", endpoint="ep-a") == 3.0
    assert value(samples, "esd_inference_job_queue_seconds_bucket", endpoint="ep-a", le="0.25") == 1
    assert value(samples, "esd_inference_job_ingest_seconds_bucket", endpoint="ep-a", le="0.025") == 1
    assert value(samples, "esd_inference_gpu_seconds_total", endpoint="ep-a") == 1.5

    for index in range(30):
        job("ep-a", "failed", run_seconds=10.0 + index, gpu_seconds=1.0, owner="bob")
        job("ep-b", "inprogress")
    with CaptureQueriesContext(connection) as many:
        samples = scrape(client)
    assert len(many) == len(one)  # GROUP BY queries: the cost of a scrape does not grow with the jobs
    assert value(samples, "esd_inference_job_run_seconds_count", endpoint="ep-a") == 31
    assert value(samples, "esd_inference_job_run_seconds_bucket", endpoint="ep-a", le="30.0") == 22  # 3.0 and 10..30
    assert value(samples, "esd_inference_jobs", endpoint="ep-a", status="failed") == 30
    assert value(samples, "esd_inference_jobs", endpoint="ep-b", status="inprogress") == 30
    assert value(samples, "esd_inference_job_run_seconds_count", endpoint="ep-b") is None  # none finished
    assert value(samples, "esd_inference_gpu_seconds_total", endpoint="ep-a") == 31.5


@pytest.mark.django_db
def test_the_user_label_of_gpu_seconds_is_opt_in(client, settings):
    job("ep-a", "succeed", gpu_seconds=1.5, owner="alice")
    job("ep-a", "succeed", gpu_seconds=2.0, owner="bob")
    samples = scrape(client)
    gpu = {labels: seconds for (name, labels), seconds in samples.items() if name == "esd_inference_gpu_seconds_total"}
    assert gpu == {frozenset({("endpoint", "ep-a")}): 3.5}  # no user names, one series per endpoint

    settings.ESD_METRICS_USER_LABELS = True
    samples = scrape(client)
    assert value(samples, "esd_inference_gpu_seconds_total", endpoint="ep-a") is None
    assert value(samples, "esd_inference_gpu_seconds_total", endpoint="ep-a", user="alice") == 1.5
    assert value(samples, "esd_inference_gpu_seconds_total", endpoint="ep-a", user="bob") == 2.0


def endpoints_with_workers_and_cold_starts(count: int, first: int = 0) -> None:
    """``count`` self-hosted endpoints, each with a live and a stale worker and two cold starts (the later one
    lasting index + 1 seconds)."""
    now = timezone.now()
    for index in range(first, first + count):
        name = f"esd-async-{index:04d}"
        Endpoint.objects.create(
            name=name, endpoint_type="Async", backend="self-hosted", status="InService", instance_type="cpu",
            creator="admin", current_instance_count=1,
        )  # fmt: skip
        Worker.objects.create(endpoint_name=name, worker=f"w{index}", last_seen=now)
        Worker.objects.create(endpoint_name=name, worker=f"old{index}", last_seen=now - timedelta(hours=1))
        for minutes, seconds in ((30, 100.0), (5, index + 1.0)):
            at = now - timedelta(minutes=minutes)
            ColdStart.objects.create(
                endpoint_name=name, worker=f"w{index}", queued_at=at - timedelta(seconds=seconds), started_at=at,
                seconds=seconds,
            )  # fmt: skip


@pytest.mark.django_db
def test_a_scrape_costs_the_same_queries_with_one_endpoint_or_ten(client):
    endpoints_with_workers_and_cold_starts(1)
    with CaptureQueriesContext(connection) as one:
        samples = scrape(client)
    assert value(samples, "esd_endpoint_workers_live", endpoint="esd-async-0000", backend="self-hosted") == 1
    assert value(samples, "esd_endpoint_cold_start_last_seconds", endpoint="esd-async-0000") == 1.0

    endpoints_with_workers_and_cold_starts(9, first=1)
    with CaptureQueriesContext(connection) as ten:
        samples = scrape(client)
    assert len(ten) == len(one), [query["sql"] for query in ten]
    for index in range(10):
        name = f"esd-async-{index:04d}"
        assert value(samples, "esd_endpoint_workers_live", endpoint=name, backend="self-hosted") == 1, name
        assert value(samples, "esd_endpoint_backlog", endpoint=name) == 0, name
        assert value(samples, "esd_endpoint_cold_start_seconds_count", endpoint=name) == 2, name
        assert value(samples, "esd_endpoint_cold_start_seconds_sum", endpoint=name) == 100.0 + index + 1, name
        assert value(samples, "esd_endpoint_cold_start_last_seconds", endpoint=name) == index + 1.0, name


@pytest.mark.django_db
def test_training_jobs_by_status(client):
    for status in ("Training", "Training", "Completed", "Failed"):
        TrainingJob.objects.create(id=uuid.uuid4(), owner="alice", backend="self-hosted", status=status)
    samples = scrape(client)
    assert value(samples, "esd_training_jobs", status="Training") == 2
    assert value(samples, "esd_training_jobs", status="Completed") == 1
    assert value(samples, "esd_training_jobs", status="Failed") == 1


@pytest.mark.django_db
def test_a_failing_collector_is_named_and_the_others_still_answer(client):
    @monitoring.metrics_collector("zz-broken")
    def broken():
        raise RuntimeError("no database")

    try:
        samples = scrape(client)
    finally:
        monitoring._COLLECTORS.pop("zz-broken")
    assert value(samples, "esd_scrape_collector_success", collector="zz-broken") == 0
    assert value(samples, "esd_scrape_collector_success", collector="inference") == 1
    assert value(samples, "esd_scrape_collector_success", collector="endpoints") == 1


@pytest.mark.django_db(transaction=True)
def test_metrics_follow_a_job_from_queued_to_run_to_finished(api, admin_key, settings, worker, gpu, registered, client):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    body = {**endpoint_body("Async", "m1"), "autoscaling_enabled": True, "min_instance_number": 0}
    answer = api.post("endpoints", {**body, "max_instance_number": 2}, key=admin_key)
    assert answer.status == 202, answer.body
    name = answer.body["data"]["endpoint_name"]
    first = gpu(name)
    # autoscaling from 0: InService before any worker, so wait for the worker's first heartbeat
    wait_until(lambda: Endpoint.objects.filter(name=name, status="InService", current_instance_count=1).exists())
    first.stop(timeout=60)  # its heartbeat is still fresh: InService, live, but nobody reads the queue now

    idle = scrape(client)
    assert value(idle, "esd_endpoint_workers_live", endpoint=name, backend="self-hosted") == 1
    assert value(idle, "esd_endpoint_backlog", endpoint=name) == 0
    assert value(idle, "esd_endpoint_workers_desired", endpoint=name) == 0
    assert value(idle, "esd_endpoints", backend="self-hosted", status="InService") == 1

    created = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    )
    assert created.status == 201, created.body
    inference = created.body["data"]["inference"]
    assert requests.put(inference["api_params_s3_upload_url"], data=json.dumps(PARAMS), timeout=30).status_code == 200
    assert value(scrape(client), "esd_inference_jobs", endpoint=name, status="created") == 1

    assert api.put(f"inferences/{inference['id']}/start", key=admin_key).status == 202
    queued = wait_until(lambda: (s := scrape(client)) and value(s, "esd_endpoint_backlog", endpoint=name) and s)
    assert value(queued, "esd_endpoint_backlog", endpoint=name) == 1
    assert value(queued, "esd_endpoint_workers_desired", endpoint=name) == 1  # ceil(1 / 3), within 0..2
    assert value(queued, "esd_inference_jobs", endpoint=name, status="inprogress") == 1
    assert value(queued, "esd_inference_jobs", endpoint=name, status="created") is None
    assert value(queued, "esd_inference_job_queue_seconds_count", endpoint=name) is None

    time.sleep(0.5)  # the job waits in the queue at least this long
    gpu(name)
    wait_until(lambda: InferenceJob.objects.filter(pk=inference["id"], status="succeed").exists(), timeout=90)
    done = scrape(client)
    assert value(done, "esd_inference_jobs", endpoint=name, status="succeed") == 1
    assert value(done, "esd_inference_jobs", endpoint=name, status="inprogress") is None
    assert value(done, "esd_endpoint_backlog", endpoint=name) == 0
    assert value(done, "esd_endpoint_workers_desired", endpoint=name) == 0
    for part in ("queue", "run", "ingest"):
        assert value(done, f"esd_inference_job_{part}_seconds_count", endpoint=name) == 1, part
        assert value(done, f"esd_inference_job_{part}_seconds_bucket", endpoint=name, le="+Inf") == 1, part
    queue_wait = value(done, "esd_inference_job_queue_seconds_sum", endpoint=name)
    run = value(done, "esd_inference_job_run_seconds_sum", endpoint=name)
    assert queue_wait >= 0.5 and run > 0
    gpu_seconds = value(done, "esd_inference_gpu_seconds_total", endpoint=name)
    assert 0 < gpu_seconds <= run
    row = InferenceJob.objects.get(pk=inference["id"])
    assert (row.queue_seconds, row.run_seconds, row.gpu_seconds) == (queue_wait, run, gpu_seconds)
    assert row.queue_seconds + row.run_seconds <= (row.complete_time - row.start_time).total_seconds()
