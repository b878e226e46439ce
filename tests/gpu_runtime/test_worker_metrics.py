"""The GPU worker's own ``/metrics``, ``/healthz`` and ``/readyz`` (``--metrics-port``): a real worker on the tiny
model reading a real broker queue (Redis when DRAMATIQ_BROKER_URL is set, else the in-process broker), scraped over
HTTP while jobs are refused, run and finished."""

import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("diffusers")

from prometheus_client.parser import text_string_to_metric_families

from gpu_runtime.worker import GpuWorker
from tests.gpu_runtime.conftest import make_request
from tests.gpu_runtime.test_worker import BASE, Events, broker, queues, send  # noqa: F401 - fixtures


def get(base: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"{base}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def scrape(base: str) -> dict[tuple[str, frozenset], float]:
    status, data = get(base, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(data.decode())
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_worker_metrics_and_probes_follow_its_jobs(broker, queues, engine, files):  # noqa: F811
    endpoint, events_queue = queues
    worker = GpuWorker(broker, engine, endpoint, events_queue=events_queue, instance_type="cpu", poll_ms=50)
    server = worker.serve_metrics(0, host="127.0.0.1")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    events = Events(broker, events_queue)
    try:
        assert get(base, "/healthz") == (200, json.dumps({"statusCode": 200, "message": "alive"}).encode())
        status, body = get(base, "/readyz")
        assert status == 503
        assert json.loads(body)["message"] == "not ready: broker, threads"  # not started yet
        before = scrape(base)

        worker.start()
        events.wait(lambda e: e["kind"] == "heartbeat")
        status, body = get(base, "/readyz")
        assert (status, json.loads(body)) == (
            200,
            {"statusCode": 200, "message": "ready", "checks": {"broker": "ok", "threads": "ok", "engine": "ok"}},
        )

        send(broker, endpoint, "refused", make_request(files, "refused", {**BASE, "sampler_name": "Foo"}))
        send(broker, endpoint, "two", make_request(files, "two", {**BASE, "batch_size": 2}))
        results = events.results(["refused", "two"])
        assert results["refused"]["invocationStatus"] == "Failed"
        assert results["two"]["invocationStatus"] == "Completed"
        # the result carries the worker's own durations: the server splits the latency without comparing clocks
        assert 0 < results["two"]["gpuSeconds"] <= results["two"]["runSeconds"]

        after = scrape(base)
        assert value(after, "esd_runtime_images_total", queue=endpoint) == 2
        assert value(after, "esd_runtime_jobs_total", queue=endpoint, outcome="ok") == 1
        assert value(after, "esd_runtime_jobs_total", queue=endpoint, outcome="failed") == 1
        assert value(after, "esd_runtime_errors_total", queue=endpoint, kind="rejected") == 1
        assert value(after, "esd_runtime_errors_total", queue=endpoint, kind="internal") == 0
        assert value(after, "esd_runtime_batch_size_count", queue=endpoint) == 1
        assert value(after, "esd_runtime_batch_size_sum", queue=endpoint) == 2  # two images in one call
        assert value(after, "esd_runtime_batch_size_bucket", queue=endpoint, le="1.0") == 0
        assert value(after, "esd_runtime_iterations_total", queue=endpoint) == 3  # 3 steps over the batch
        assert value(after, "esd_runtime_iterations_per_second", queue=endpoint) > 0
        assert value(after, "esd_runtime_job_run_seconds_count", queue=endpoint) == 2
        # the engine of this test is fresh: the tiny checkpoint was loaded once
        loads = value(after, "esd_runtime_model_load_seconds_count") - value(
            before, "esd_runtime_model_load_seconds_count"
        )
        assert loads == 1
        assert value(after, "esd_runtime_model_load_seconds_sum") > value(before, "esd_runtime_model_load_seconds_sum")
        assert ("esd_runtime_vram_bytes", frozenset()) in after  # 0 on this CPU host
    finally:
        worker.stop(timeout=60)
    status, body = get(base, "/readyz")
    assert status == 503 and json.loads(body)["message"] == "not ready: broker, threads"
    server.shutdown()
