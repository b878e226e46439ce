"""The worker through a real broker queue (Redis when DRAMATIQ_BROKER_URL is set, else the in-process broker),
and the SageMaker container mode over HTTP."""

import json
import os
import socket
import threading
import time
import urllib.request
import uuid

import dramatiq
import pytest

pytest.importorskip("diffusers")

from gpu_runtime import protocol
from gpu_runtime.worker import GpuWorker, make_broker
from tests.gpu_runtime.conftest import make_request, pixels, png_size

BASE = {"prompt": "a photo of a cat", "seed": 5, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


@pytest.fixture
def broker():
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    if url:
        yield make_broker(url)
    else:
        from dramatiq.brokers.stub import StubBroker

        yield StubBroker(middleware=[])


@pytest.fixture
def queues():
    tag = uuid.uuid4().hex[:8]
    return f"esd-async-t{tag}", f"events-{tag}"


class Events:
    """Reads the events queue the way the control plane's runtime_event actor would."""

    def __init__(self, broker, queue):
        broker.declare_queue(queue)
        self.consumer = broker.consume(queue, prefetch=100, timeout=100)
        self.seen: list[dict] = []

    def wait(self, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = next(self.consumer)
            if message is not None:
                event = message.args[0]
                protocol.validate_event(event)
                self.seen.append(event)
                self.consumer.ack(message)
            found = [e for e in self.seen if predicate(e)]
            if found:
                return found
        raise AssertionError(f"no such event; saw {[e['kind'] for e in self.seen]}")

    def results(self, job_ids, timeout=90):
        ids = set(job_ids)
        self.wait(
            lambda e: (
                e["kind"] == "inference" and ids <= {x["inferenceId"] for x in self.seen if x["kind"] == "inference"}
            ),
            timeout,
        )
        return {e["inferenceId"]: e for e in self.seen if e["kind"] == "inference"}


def send(broker, queue, job_id, request):
    broker.declare_queue(queue)
    broker.enqueue(
        dramatiq.Message(
            queue_name=queue, actor_name=protocol.RUN_INFERENCE, args=(job_id, request), kwargs={}, options={}
        )
    )


def test_worker_runs_jobs_reports_and_survives_bad_ones(broker, queues, engine, files):
    endpoint, events_queue = queues
    worker = GpuWorker(broker, engine, endpoint, events_queue=events_queue, instance_type="cpu", poll_ms=50)
    events = Events(broker, events_queue)
    worker.start()
    try:
        heartbeat = events.wait(lambda e: e["kind"] == "heartbeat")[0]
        assert (heartbeat["endpoint"], heartbeat["instance_type"]) == (endpoint, "cpu")
        # the runtime's capability summary rides along, so the console can show what this worker does
        from gpu_runtime.protocol import policy

        assert heartbeat["capabilities"]["digest"] == policy.digest(engine.capabilities())
        assert heartbeat["capabilities"]["samplers"] == list(policy.SAMPLER_NAMES)
        send(broker, endpoint, "bad", make_request(files, "bad", {**BASE, "sampler_name": "Foo"}))
        send(broker, endpoint, "broken", {"task": "txt2img"})  # not even a valid request
        send(broker, endpoint, "good", make_request(files, "good", BASE))
        results = events.results(["bad", "good"])
        assert results["bad"]["invocationStatus"] == "Failed"
        assert "sampler Foo is not supported" in results["bad"]["failureReason"]
        assert files.output("bad") == {"error": results["bad"]["failureReason"]}
        assert results["good"]["invocationStatus"] == "Completed"
        assert png_size(files.output("good")["images"][0]) == (64, 64)
        progress = [e for e in events.seen if e["kind"] == "progress" and e["inferenceId"] == "good"]
        assert progress and progress[-1]["step"] == progress[-1]["steps"] == 3
        # a redelivered job is not run twice; img2img from the image just made
        send(broker, endpoint, "good", make_request(files, "good", BASE))
        img2img = make_request(
            files,
            "i2i",
            {**BASE, "init_images": [files.output("good")["images"][0]], "denoising_strength": 0.5},
            task="img2img",
        )
        send(broker, endpoint, "i2i", img2img)
        results = events.results(["i2i"])
        assert results["i2i"]["invocationStatus"] == "Completed"
        assert png_size(files.output("i2i")["images"][0]) == (64, 64)
        assert len([e for e in events.seen if e["kind"] == "inference" and e["inferenceId"] == "good"]) == 1
    finally:
        worker.stop(timeout=60)


def test_queued_compatible_jobs_run_as_one_batch(broker, queues, engine, files):
    endpoint, events_queue = queues
    prompts = ["a photo of a cat", "a red dog", "the painting"]
    for i, prompt in enumerate(prompts):  # queued before the worker starts: it takes them together
        send(broker, endpoint, f"q{i}", make_request(files, f"q{i}", {**BASE, "prompt": prompt, "seed": 20 + i}))
    calls = []
    original = engine.run
    engine.run = lambda jobs, progress=None, stop=None: calls.append(len(jobs)) or original(jobs, progress, stop)
    worker = GpuWorker(broker, engine, endpoint, events_queue=events_queue, poll_ms=50)
    events = Events(broker, events_queue)
    worker.start()
    try:
        results = events.results(["q0", "q1", "q2"])
    finally:
        worker.stop(timeout=60)
    assert all(r["invocationStatus"] == "Completed" for r in results.values())
    assert calls == [3]
    engine.run = original
    for i, prompt in enumerate(prompts):
        alone = engine.run([engine.prepare("x", make_request(files, "x", {**BASE, "prompt": prompt, "seed": 20 + i}))])
        assert abs(pixels(files.output(f"q{i}")["images"][0]) - pixels(alone[0]["images"][0])).max() <= 1


def test_stop_finishes_the_job_in_hand(broker, queues, engine, files):
    endpoint, events_queue = queues
    worker = GpuWorker(broker, engine, endpoint, events_queue=events_queue, poll_ms=50)
    events = Events(broker, events_queue)
    send(broker, endpoint, "long", make_request(files, "long", {**BASE, "steps": 12}))
    worker.start()
    events.wait(lambda e: e["kind"] == "progress" and e["inferenceId"] == "long")
    worker.stop(timeout=60)  # what SIGTERM does
    assert events.results(["long"])["long"]["invocationStatus"] == "Completed"


def test_serve_mode_over_http(engine, files):
    from gpu_runtime.server import make_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = make_server(engine, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{base}/ping", timeout=10) as ping:
            assert ping.status == 200

        def invoke(body: dict) -> tuple[int, dict]:
            request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(), method="POST")
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())

        status, output = invoke(make_request(files, "sm", BASE))
        assert status == 200 and png_size(output["images"][0]) == (64, 64)
        status, output = invoke(make_request(files, "sm", {**BASE, "steps": 0}))
        assert status == 200 and output == {"error": "steps must be between 1 and 150"}
        status, output = invoke({"task": "nope"})
        assert status == 200 and "request.task" in output["error"]
    finally:
        server.shutdown()
