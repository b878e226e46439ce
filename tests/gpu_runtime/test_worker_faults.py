"""Workers that survive faults: lost broker connections, long jobs on RabbitMQ, redeliveries, concurrent SageMaker
invocations, flaky storage. Each test is named after the defect it guards against.

Real services where the fault is theirs: Redis (when DRAMATIQ_BROKER_URL is a redis:// URL, as in CI's second
pass) and RabbitMQ (RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672/; skipped when it is not reachable).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.errors import ConnectionClosed

pytest.importorskip("diffusers")

from gpu_runtime import protocol, transfer
from gpu_runtime.errors import JobError
from gpu_runtime.training_worker import TrainingWorker
from gpu_runtime.worker import GpuWorker, make_broker
from tests.gpu_runtime.conftest import make_request, png_size
from tests.gpu_runtime.test_worker import BASE, Events, send

RABBITMQ_URL = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def tags() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"esd-async-f{tag}", f"events-f{tag}"


class Gate:
    """Wraps ``engine.run`` so a test can hold a job on the work thread, and counts the jobs each call ran."""

    def __init__(self, engine, hold: set[str] = frozenset()):
        self.original = engine.run
        self.hold = set(hold)
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls: list[list[str]] = []
        engine.run = self

    def __call__(self, jobs, progress=None, stop=None):
        ids = [job.job_id for job in jobs]
        self.calls.append(ids)
        if self.hold & set(ids):
            self.started.set()
            assert self.release.wait(30), "the test never released the job"
        return self.original(jobs, progress, stop)


class Heartbeats:
    """Records, through the worker's own ``send``, every heartbeat it sends and when."""

    def __init__(self, worker):
        self.times: list[float] = []
        original = worker.send

        def send(event: dict) -> None:
            if event["kind"] == "heartbeat":
                self.times.append(time.monotonic())
            original(event)

        worker.send = send

    def count(self) -> int:
        return len(self.times)


def assert_no_heartbeat_while_down(worker, heartbeats: Heartbeats, quiet: float = 0.8) -> None:
    """With the consumer lost, heartbeats stop (one already under way when it failed may still go out)."""
    wait_for(lambda: not worker.consuming.is_set(), 10, "the worker to notice the lost consumer")
    time.sleep(0.3)
    before = heartbeats.count()
    time.sleep(quiet)
    assert heartbeats.count() == before, "a heartbeat was sent while the consumer was down"


# --- a lost consumer, deterministically (every pass) ------------------------------------------------------------


class FlakyBroker(StubBroker):
    """A stub broker whose consumer of one queue fails while ``down`` is set, like a killed connection."""

    def __init__(self, flaky_queue: str):
        super().__init__(middleware=[])
        self.flaky_queue = flaky_queue
        self.down = threading.Event()
        self.consumers = 0

    def consume(self, queue_name, prefetch=1, timeout=100):
        inner = super().consume(queue_name, prefetch, timeout)
        if queue_name != self.flaky_queue:
            return inner
        if self.down.is_set():
            raise ConnectionClosed(ConnectionResetError("broker unreachable"))
        self.consumers += 1
        return FlakyConsumer(inner, self)


class FlakyConsumer:
    def __init__(self, inner, broker: FlakyBroker):
        self.inner, self.broker, self.lost = inner, broker, False

    def __next__(self):
        if self.broker.down.is_set() or self.lost:
            self.lost = True  # a consumer that lost its connection stays broken
            raise ConnectionClosed(ConnectionResetError("connection reset by peer"))
        return next(self.inner)

    def ack(self, message):
        if self.lost:
            raise ConnectionClosed(ConnectionResetError("connection reset by peer"))
        self.inner.ack(message)

    def requeue(self, messages):
        self.inner.requeue(messages)

    def close(self):
        self.inner.close()


def test_lost_consumer_is_recreated_and_no_heartbeat_is_sent_while_down(engine, files):
    endpoint, events_queue = tags()
    broker = FlakyBroker(endpoint)
    gate = Gate(engine, hold={"held"})
    worker = GpuWorker(broker, engine, endpoint, events_queue=events_queue, heartbeat_seconds=0.05, poll_ms=20)
    heartbeats = Heartbeats(worker)
    events = Events(broker, events_queue)
    worker.start()
    try:
        events.wait(lambda e: e["kind"] == "heartbeat")
        send(broker, endpoint, "held", make_request(files, "held", BASE))
        assert gate.started.wait(30)
        broker.down.set()  # the connection drops while the job runs
        assert_no_heartbeat_while_down(worker, heartbeats)
        broker.down.clear()
        wait_for(worker.consuming.is_set, 15, "the consumer to come back")
        resumed = heartbeats.count()
        wait_for(lambda: heartbeats.count() > resumed, 5, "heartbeats to resume")
        gate.release.set()
        assert events.results(["held"])["held"]["invocationStatus"] == "Completed"
        send(broker, endpoint, "next", make_request(files, "next", {**BASE, "seed": 9}))
        assert events.results(["next"])["next"]["invocationStatus"] == "Completed"
        assert worker.reconnects >= 1 and broker.consumers >= 2
    finally:
        gate.release.set()
        worker.stop(timeout=60)
    assert broker.queues[endpoint].unfinished_tasks == 0  # the held job was acked on the new consumer
    assert gate.calls == [["held"], ["next"]]


# --- Redis: connections killed ----------------------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of Redis: the test can see the worker's connections (to kill them in Redis) and take
    the broker away for a while (connections are cut, new ones are closed at once) without touching Redis."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.is_down = threading.Event()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def upstream_addresses(self) -> list[str]:
        """The worker's connections as Redis sees them (``CLIENT KILL ADDR``)."""
        with self.lock:
            live = [up for _, up in self.pairs if up.fileno() != -1]
        addresses = []
        for up in live:
            try:
                host, port = up.getsockname()[:2]
            except OSError:
                continue
            addresses.append(f"{host}:{port}")
        return addresses

    def down(self) -> None:
        self.is_down.set()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def up(self) -> None:
        self.is_down.clear()

    def close(self) -> None:
        self.down()
        self.listener.close()


def redis_url() -> str:
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    if not url.startswith("redis://"):
        pytest.skip("needs Redis: set DRAMATIQ_BROKER_URL=redis://127.0.0.1:6379/0 (CI's second pass does)")
    return url


def test_redis_connection_killed_mid_run_is_reconnected(engine, files):
    """Redis drops the worker's connections (``CLIENT KILL``) mid-job, then is unreachable for a while: the job in
    hand completes and is acked, heartbeats stop while the consumer is down and resume after, the next job runs.

    Only the worker's own connections are killed (``CLIENT KILL ADDR`` for each connection through the proxy)
    rather than ``CLIENT KILL TYPE normal SKIPME yes``, which would also cut every other client of a shared Redis.
    """
    import redis

    url = redis_url()
    parts = urllib.parse.urlsplit(url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    admin = redis.Redis.from_url(url)
    endpoint, events_queue = tags()
    worker_broker = make_broker(urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{proxy.port}")))
    observer = make_broker(url)  # the control plane's side, not through the proxy
    gate = Gate(engine, hold={"k1"})
    worker = GpuWorker(worker_broker, engine, endpoint, events_queue=events_queue, heartbeat_seconds=0.1)
    heartbeats = Heartbeats(worker)
    events = Events(observer, events_queue)
    worker.start()
    try:
        events.wait(lambda e: e["kind"] == "heartbeat" and e["endpoint"] == endpoint)
        send(observer, endpoint, "k1", make_request(files, "k1", BASE))
        assert gate.started.wait(30)
        addresses = proxy.upstream_addresses()
        assert addresses
        killed = sum(admin.client_kill_filter(_id=None, addr=address) for address in addresses)
        assert killed >= 1
        proxy.down()  # and Redis stays unreachable for a while
        assert_no_heartbeat_while_down(worker, heartbeats)
        proxy.up()
        wait_for(worker.consuming.is_set, 20, "the consumer to reconnect")
        seen = len(events.seen)
        events.wait(lambda _: any(e["kind"] == "heartbeat" for e in events.seen[seen:]), 10)  # heartbeats resume
        gate.release.set()
        assert events.results(["k1"])["k1"]["invocationStatus"] == "Completed"
        send(observer, endpoint, "k2", make_request(files, "k2", {**BASE, "seed": 11}))
        assert events.results(["k2"])["k2"]["invocationStatus"] == "Completed"
        assert worker.reconnects >= 1
    finally:
        gate.release.set()
        worker.stop(timeout=60)
        proxy.close()
    assert png_size(files.output("k2")["images"][0]) == (64, 64)
    assert admin.hlen(f"dramatiq:{endpoint}.msgs") == 0  # both acked: nothing left to redeliver
    assert [e["inferenceId"] for e in events.seen if e["kind"] == "inference"].count("k1") == 1


# --- RabbitMQ: a job longer than the AMQP heartbeat -------------------------------------------------------------


def rabbitmq_reachable(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2).close()
    except OSError:
        return False
    return True


def test_rabbitmq_job_longer_than_heartbeat_keeps_connection(engine, files):
    """A job blocks the work thread for 4 AMQP heartbeat intervals: the consumer thread keeps the connection
    answered, so the result arrives, the message is acked once (nothing redelivered) and the next job runs."""
    if not rabbitmq_reachable(RABBITMQ_URL):
        pytest.skip(f"needs RabbitMQ at {RABBITMQ_URL} (set RABBITMQ_URL; .ci/run starts it)")
    separator = "&" if "?" in RABBITMQ_URL else "?"
    endpoint, events_queue = tags()
    worker_broker = make_broker(f"{RABBITMQ_URL}{separator}heartbeat=2")
    observer = make_broker(RABBITMQ_URL)
    original = engine.run
    calls: list[str] = []

    def slow_run(jobs, progress=None, stop=None):
        """Block on the work thread mid-job, after this thread has opened its publisher connection."""
        calls.extend(job.job_id for job in jobs)

        def slow_progress(step: int, steps: int) -> None:
            progress(step, steps)
            if step == 1 and jobs[0].job_id == "r1":
                time.sleep(8)

        return original(jobs, slow_progress, stop)

    engine.run = slow_run

    def enqueue(job_id: str, params: dict) -> None:
        publisher = make_broker(RABBITMQ_URL)  # a fresh connection: the test thread idles between sends
        try:
            send(publisher, endpoint, job_id, make_request(files, job_id, params))
        finally:
            publisher.close()

    worker = GpuWorker(worker_broker, engine, endpoint, events_queue=events_queue, heartbeat_seconds=1, poll_ms=50)
    events = Events(observer, events_queue)
    worker.start()
    try:
        enqueue("r1", BASE)
        assert events.results(["r1"], timeout=60)["r1"]["invocationStatus"] == "Completed"
        enqueue("r2", {**BASE, "seed": 12})
        assert events.results(["r2"], timeout=60)["r2"]["invocationStatus"] == "Completed"
        assert worker.reconnects == 0  # the consumer's connection survived the long job
    finally:
        worker.stop(timeout=60)
        events.consumer.close()
    try:
        assert observer.get_queue_message_counts(endpoint) == (0, 0, 0)  # acked: nothing went back to the queue
        assert calls == ["r1", "r2"]
        inference = [e["inferenceId"] for e in events.seen if e["kind"] == "inference"]
        assert sorted(inference) == ["r1", "r2"]
        progress = [e for e in events.seen if e["kind"] == "progress" and e["inferenceId"] == "r1"]
        assert progress[-1]["step"] == progress[-1]["steps"]  # sent after the long pause: the publisher recovered
    finally:
        for name in (endpoint, events_queue):  # durable queues: leave none behind
            for suffix in ("", ".DQ", ".XQ"):
                observer.channel.queue_delete(name + suffix)
        observer.close()
        worker_broker.close()


# --- redelivery while the first delivery runs ---------------------------------------------------------------------


@pytest.fixture
def env_broker():
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    return make_broker(url) if url else StubBroker(middleware=[])


def leftover(broker, queue: str) -> int:
    """Messages of ``queue`` not acked yet, whatever the broker."""
    if isinstance(broker, StubBroker):
        return broker.queues[queue].unfinished_tasks
    if hasattr(broker, "client"):  # Redis: acking deletes the message body
        return broker.client.hlen(f"{broker.namespace}:{queue}.msgs")
    return sum(broker.get_queue_message_counts(queue))


def test_redelivered_message_is_not_run_while_its_first_delivery_runs(env_broker, engine, files):
    endpoint, events_queue = tags()
    gate = Gate(engine, hold={"dup"})
    worker = GpuWorker(env_broker, engine, endpoint, events_queue=events_queue, poll_ms=20)
    events = Events(env_broker, events_queue)
    worker.start()
    try:
        send(env_broker, endpoint, "dup", make_request(files, "dup", BASE))
        assert gate.started.wait(30)
        send(env_broker, endpoint, "dup", make_request(files, "dup", BASE))  # the same job delivered again
        wait_for(lambda: "dup" in worker._held, 10, "the second delivery to arrive")
        gate.release.set()
        assert events.results(["dup"])["dup"]["invocationStatus"] == "Completed"
        send(env_broker, endpoint, "dup", make_request(files, "dup", BASE))  # and once more after it finished
        send(env_broker, endpoint, "after", make_request(files, "after", {**BASE, "seed": 13}))
        assert events.results(["after"])["after"]["invocationStatus"] == "Completed"
    finally:
        gate.release.set()
        worker.stop(timeout=60)
    assert gate.calls == [["dup"], ["after"]]
    assert [e["inferenceId"] for e in events.seen if e["kind"] == "inference"].count("dup") == 1
    assert leftover(env_broker, endpoint) == 0  # every delivery was acked


# --- SageMaker serve mode -----------------------------------------------------------------------------------------


def test_serve_mode_runs_one_invocation_at_a_time_and_pings_meanwhile(engine, files):
    from gpu_runtime.server import make_server

    original = engine.run
    state = {"active": 0, "most": 0, "runs": 0}
    lock = threading.Lock()
    running = threading.Event()
    release = threading.Event()  # the first invocation is held in its run until the ping has been answered

    def counting_run(jobs, progress=None):
        with lock:
            state["active"] += 1
            state["runs"] += 1
            state["most"] = max(state["most"], state["active"])
        running.set()
        try:
            assert release.wait(60)
            return original(jobs, progress)
        finally:
            with lock:
                state["active"] -= 1

    engine.run = counting_run
    server = make_server(engine, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    answers: dict[str, dict] = {}

    def invoke(name: str, seed: int) -> None:
        body = json.dumps(make_request(files, name, {**BASE, "seed": seed})).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            answers[name] = json.loads(response.read())

    try:
        callers = [threading.Thread(target=invoke, args=(f"sm{i}", 30 + i)) for i in range(2)]
        for caller in callers:
            caller.start()
        assert running.wait(30)
        started = time.monotonic()
        with urllib.request.urlopen(f"{base}/ping", timeout=5) as ping:
            assert ping.status == 200
        assert time.monotonic() - started < 5, "/ping waited for an invocation"
        time.sleep(0.5)  # the second invocation meanwhile tries to overlap the held one
        assert state["active"] == 1
        release.set()
        for caller in callers:
            caller.join(60)
    finally:
        release.set()
        server.shutdown()
    assert state["runs"] == 2 and state["most"] == 1
    assert all(png_size(answers[name]["images"][0]) == (64, 64) for name in ("sm0", "sm1"))


# --- the training worker's heartbeat --------------------------------------------------------------------------------


def test_training_worker_heartbeats_with_its_queue_name_only_while_consuming(tmp_path):
    queue, events_queue = f"esd-training-f{uuid.uuid4().hex[:8]}", f"events-{uuid.uuid4().hex[:8]}"
    broker = FlakyBroker(queue)
    worker = TrainingWorker(
        broker, tmp_path, queue=queue, events_queue=events_queue, poll_ms=20, heartbeat_seconds=0.05
    )
    heartbeats = Heartbeats(worker)
    events = Events(broker, events_queue)
    worker.start()
    try:
        beat = events.wait(lambda e: e["kind"] == "heartbeat")[0]
        assert beat["endpoint"] == queue and beat["worker"] == worker.worker_id
        broker.down.set()
        assert_no_heartbeat_while_down(worker, heartbeats)
        broker.down.clear()
        wait_for(worker.consuming.is_set, 15, "the consumer to come back")
        resumed = heartbeats.count()
        wait_for(lambda: heartbeats.count() > resumed, 5, "heartbeats to resume")
        # a cancel is handled on the consumer thread and acked
        broker.enqueue(
            dramatiq.Message(queue_name=queue, actor_name=protocol.CANCEL_TRAINING, args=("t1",), kwargs={}, options={})
        )
        wait_for(lambda: worker.is_cancelled("t1"), 10, "the cancel")
    finally:
        worker.stop(timeout=30)
    assert broker.queues[queue].unfinished_tasks == 0


# --- transfers ----------------------------------------------------------------------------------------------------


class Flaky(BaseHTTPRequestHandler):
    """``/flaky``: 503 the first time, then 200. ``/short-once``: a body cut short once, then whole. ``/missing``:
    404. ``PUT /put``: 503 once, then kept."""

    hits: dict[str, int] = {}
    puts: list[bytes] = []
    body = b"x" * 1000

    def log_message(self, *args) -> None:
        pass

    def _count(self) -> int:
        Flaky.hits[self.path] = Flaky.hits.get(self.path, 0) + 1
        return Flaky.hits[self.path]

    def do_GET(self) -> None:
        hit = self._count()
        if self.path == "/missing":
            self.send_error(404)
        elif self.path == "/flaky" and hit == 1:
            self.send_error(503)
        elif self.path in ("/flaky", "/short-once"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            if self.path == "/short-once" and hit == 1:
                self.wfile.write(self.body[:100])
                self.close_connection = True
                return
            self.wfile.write(self.body)
        else:
            self.send_error(400)

    def do_PUT(self) -> None:
        hit = self._count()
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if hit == 1:
            self.send_error(503)
            return
        Flaky.puts.append(data)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def flaky_server():
    Flaky.hits, Flaky.puts = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_transfer_retries_a_503_and_a_cut_short_body_and_names_a_404(flaky_server, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "BACKOFF_FACTOR", 0.01)
    assert transfer.get_bytes(f"{flaky_server}/flaky") == Flaky.body
    assert Flaky.hits["/flaky"] == 2
    with pytest.raises(JobError, match="the parameters could not be read: HTTP 404"):
        transfer.get_bytes(f"{flaky_server}/missing")
    assert Flaky.hits["/missing"] == 1  # a 404 is not retried
    with pytest.raises(JobError, match="must be an http"):
        transfer.get_bytes("file:///etc/passwd")
    with pytest.raises(JobError, match="the job has no parameters"):
        transfer.get_bytes("")

    target = tmp_path / "model.bin"
    assert transfer.download_file(f"{flaky_server}/short-once", target, "the model") == len(Flaky.body)
    assert target.read_bytes() == Flaky.body and Flaky.hits["/short-once"] == 2
    with pytest.raises(JobError, match="downloading the model failed: HTTP 404"):
        transfer.download_file(f"{flaky_server}/missing", tmp_path / "gone.bin", "the model")
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "gone.bin").exists()
    with pytest.raises(JobError, match="the URL of the model must be http"):
        transfer.download_file("file:///etc/passwd", target, "the model")

    upload = Path(tmp_path / "out.safetensors")
    upload.write_bytes(b"weights" * 100)
    transfer.put(f"{flaky_server}/put", upload, "out.safetensors")  # a file body is rewound for the retry
    assert Flaky.puts == [upload.read_bytes()] and Flaky.hits["/put"] == 2

    with socket.socket() as sock:  # nobody listens there
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    assert transfer.status_of(f"http://127.0.0.1:{closed}/cancel") is None
    assert transfer.status_of(f"{flaky_server}/missing") == 404
