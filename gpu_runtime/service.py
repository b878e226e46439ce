"""What the GPU worker and the training worker share: receiving, working, acking, heartbeats, reconnects, stopping.

Both read a queue through dramatiq's consumer API (not a dramatiq ``Worker``), report on the control plane's events
queue, and must treat a redelivered message for a job they already run or finished as a no-op. Keeping that here
means a fix to, say, graceful shutdown reaches both.

Why three threads: a job can run for minutes (a training for hours), and the broker connection must be serviced
all that time - pika's ``BlockingConnection`` answers AMQP heartbeats only while the consumer is being read, and
dramatiq's Redis consumer records its own liveness (other consumers requeue the messages of one silent for 60 s)
only when it fetches. So the *consumer thread* only receives: it keeps calling ``next(consumer)`` with its poll
timeout, hands batches to the *work thread* through a queue, and acks the messages the work thread hands back
(dramatiq consumers are not thread-safe: every call on one stays on the consumer thread). The *heartbeat thread*
tells the control plane the worker is alive - only while the consumer is healthy, so an endpoint's live-instance
count is the number of workers that can actually take a job. A consumer that raises (Redis ``CLIENT KILL``, a
RabbitMQ connection closed for missed heartbeats, a broker restart) is closed and re-created after a short,
capped backoff; the job in hand keeps running meanwhile and is acked on the new consumer where the broker allows.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import dramatiq

from gpu_runtime import metrics, protocol, transfer

log = logging.getLogger(__name__)

REMEMBERED_JOBS = 1000
HEARTBEAT_SECONDS = 15.0
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
SEND_ATTEMPTS = 3

Delivery = tuple[Any, Any]  # (the consumer that delivered it, the message)


class CancelWatch:
    """Polls a job's cancel URL (200 = cancelled; anything else, errors included, = not cancelled) in the
    background, so the check between two steps (of a training, of a denoising loop) stays a cheap flag read.

    Both workers use it: a cancel *message* reaches a worker on its consumer thread at once, but only when no
    other messages are queued ahead of it (the consumer's prefetch is limited), so the running job also polls its
    cancel marker in storage through a presigned GET. ``is_cancelled`` is the worker's own flag (the message).
    """

    def __init__(self, url: str | None, is_cancelled: Callable[[], bool], every: float, *, name: str = "cancel-watch"):
        self.url = url if url and url.startswith(("http://", "https://")) else None
        self.is_cancelled = is_cancelled
        self.every = every
        self.name = name
        self.flag = threading.Event()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def poll(self) -> bool:
        """One look at the cancel URL: 404 (not cancelled), 403 (S3's answer for a missing key) and network trouble
        all mean "not cancelled"; the next poll comes soon."""
        if self.url is None:
            return False
        cancelled = transfer.status_of(self.url) == 200
        if cancelled:
            self.flag.set()
        return cancelled

    def start(self) -> None:
        if self.url is None:
            return

        def loop() -> None:
            while not self.done.wait(self.every):
                if self.poll():
                    return

        self.thread = threading.Thread(target=loop, name=self.name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()

    def __call__(self) -> bool:
        if not self.flag.is_set():
            try:
                if self.is_cancelled():
                    self.flag.set()
            except Exception:
                log.exception("is_cancelled failed")
        return self.flag.is_set()


def _is_rabbitmq(broker: dramatiq.Broker) -> bool:
    """RabbitMQ needs per-connection care (delivery tags, per-thread publisher connections); other brokers don't."""
    try:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker
    except ImportError:  # pika is not installed: it cannot be one
        return False
    return isinstance(broker, RabbitmqBroker)


class QueueService:
    """Base of the workers. Subclasses set ``queue`` and implement :meth:`run_batch` and :meth:`_heartbeat_event`;
    they may override :meth:`job_id` (redelivery detection) and :meth:`inline` (cheap messages handled at once)."""

    thread_prefix = "queue-service"

    def __init__(
        self,
        broker: dramatiq.Broker,
        events_queue: str,
        *,
        queue_name: str,
        prefetch: int = 1,
        max_batch: int = 1,
        poll_ms: int = 200,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        worker_id: str | None = None,
        instance_type: str = "",
    ) -> None:
        self.broker = broker
        self.events_queue = events_queue
        self.queue = queue_name
        self.prefetch = prefetch
        self.max_batch = max_batch
        self.poll_ms = poll_ms
        self.heartbeat_seconds = heartbeat_seconds
        self.worker_id = worker_id or f"{socket.gethostname()}/{os.getpid()}"
        self.instance_type = instance_type
        self.stopping = threading.Event()
        self.consuming = threading.Event()  # set while the consumer answers; heartbeats are sent only then
        self.reconnects = 0  # consumers re-created after a failure (for logs and tests)
        self.done: OrderedDict[str, None] = OrderedDict()  # recently finished job ids: redelivery is a no-op
        self.running: set[str] = set()  # received and not yet acked (consumer thread only)
        self.threads: list[threading.Thread] = []
        self._rabbitmq = _is_rabbitmq(broker)
        self._wake = threading.Event()  # wakes the heartbeat thread (consumer back, or stopping)
        self._work: queue.Queue[list[Delivery] | None] = queue.Queue()
        self._finished: queue.Queue[list[Delivery]] = queue.Queue()
        self._pending: list[Delivery] = []  # received, not yet handed to the work thread
        self._held: dict[str, list[Delivery]] = {}  # redeliveries of running jobs, acked when the job ends
        self._in_flight: list[Delivery] | None = None  # the batch the work thread has
        self._to_ack: list[Delivery] = []
        self._served = False  # the current consumer has answered at least once
        broker.declare_queue(events_queue)
        broker.declare_queue(queue_name)

    # --- what subclasses provide -----------------------------------------------------------------------------------
    def run_batch(self, messages: list[Any]) -> None:
        """Run messages on the work thread (never raises out: a failure is reported as the job's)."""
        raise NotImplementedError

    def _heartbeat_event(self) -> dict:
        """The heartbeat event; the one place that builds it."""
        return protocol.heartbeat(self.queue, self.worker_id, self.instance_type)

    def job_id(self, message: Any) -> str | None:
        """The job a message runs (None: not a job), used to skip redeliveries."""
        return None

    def inline(self, message: Any) -> bool:
        """Handle a cheap message on the consumer thread at once (True), or leave it for the work thread."""
        return False

    # --- probes ----------------------------------------------------------------------------------------------------
    def readiness(self) -> dict[str, str | None]:
        """What ``/readyz`` checks (None: fine). A worker is ready when its consumer answers the broker (the same
        condition its heartbeats are sent under) and its threads are alive; subclasses add their engine."""
        dead = [t.name for t in self.threads if not t.is_alive()]
        return {
            "broker": None if self.consuming.is_set() else f"the consumer of {self.queue} is not connected",
            "threads": f"not running: {', '.join(dead)}" if dead else (None if self.threads else "not started"),
        }

    def serve_metrics(self, port: int, host: str = "0.0.0.0") -> Any:  # noqa: S104 - scraped in-cluster
        """``--metrics-port``: ``/metrics``, ``/healthz`` and ``/readyz`` of this process (gpu_runtime.metrics)."""
        return metrics.serve(port, self.readiness, host)

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the heartbeat, consumer and work threads."""
        for target, name in ((self._heartbeats, "heartbeat"), (self._receive, "consume"), (self._work_loop, "work")):
            thread = threading.Thread(target=target, name=f"{self.thread_prefix}-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work in hand, then stop (SIGTERM does this)."""
        self.stopping.set()
        self._wake.set()
        for thread in self.threads:
            thread.join(timeout)

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then finish the work in hand (the CLI commands)."""

        def graceful(signum: int, frame: Any) -> None:
            log.info("signal %s: finishing the work in hand, then stopping", signum)
            self.stopping.set()

        previous = {sig: signal.signal(sig, graceful) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self.stopping.is_set():
                self.stopping.wait(1)
            self.stop()
        finally:  # a worker that stops on its own (trainer --once) leaves the process's signals as they were
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # --- events ----------------------------------------------------------------------------------------------------
    def send(self, event: dict) -> None:
        """Put one event on the events queue for the control plane's ``runtime_event`` actor.

        Survives a lost connection: redis-py reconnects through its pool, and for RabbitMQ this thread's publisher
        connection (dramatiq keeps one per thread, and an idle one is closed by the server for missed heartbeats
        during a long job) is checked before publishing and dropped after a failure, so the retry opens a new one.
        """
        protocol.validate_event(event)
        message = dramatiq.Message(
            queue_name=self.events_queue, actor_name=protocol.RUNTIME_EVENT, args=(event,), kwargs={}, options={}
        )
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                self._check_publisher()
                self.broker.enqueue(message)
                return
            except Exception as exc:
                self._drop_publisher()
                if attempt == SEND_ATTEMPTS:
                    raise
                log.warning("sending a %s event failed (%s), retrying", event.get("kind"), exc)
                time.sleep(0.2 * attempt)

    def send_quietly(self, event: dict) -> None:
        """Send, logging a failure: a lost event is recovered by the control plane's sweeps, a crash is not."""
        try:
            self.send(event)
        except Exception:
            metrics.ERRORS.labels(self.queue, "event").inc()
            log.exception("could not send event %s", event.get("kind"))

    def _check_publisher(self) -> None:
        """RabbitMQ: service this thread's idle connection, which raises if the server has closed it meanwhile."""
        if not self._rabbitmq:
            return
        connection = getattr(self.broker.state, "connection", None)
        if connection is None:
            return
        if not connection.is_open:
            raise ConnectionError("the publisher connection is closed")
        connection.process_data_events(0)

    def _drop_publisher(self) -> None:
        """RabbitMQ: forget this thread's connection and channel, so the next publish opens fresh ones."""
        if not self._rabbitmq:
            return
        try:
            del self.broker.connection
        except Exception:
            log.debug("closing a broken publisher connection failed", exc_info=True)

    def _heartbeats(self) -> None:
        """Every ``heartbeat_seconds`` (and at once when the consumer comes back), while the consumer is healthy."""
        while not self.stopping.is_set():
            if self.consuming.is_set():
                try:
                    self.send(self._heartbeat_event())
                except Exception:
                    log.exception("heartbeat failed")
            self._wake.wait(self.heartbeat_seconds)
            self._wake.clear()

    def remember_done(self, job_id: str) -> None:
        """Record a finished job, so a redelivery of its message is acked without running it again."""
        self.done[job_id] = None
        while len(self.done) > REMEMBERED_JOBS:
            self.done.popitem(last=False)

    # --- the consumer thread ---------------------------------------------------------------------------------------
    def _receive(self) -> None:
        """Consume until stopped (and the work in hand is acked), re-creating the consumer after each failure."""
        failures = 0
        try:
            while not (self.stopping.is_set() and self._in_flight is None):
                try:
                    consumer = self.broker.consume(self.queue, prefetch=self.prefetch, timeout=self.poll_ms)
                except Exception as exc:
                    failures += 1
                    if self.stopping.is_set() and not self._work_running():
                        log.warning("stopping without a broker connection (%s): the last acks are lost", exc)
                        self._collect_finished()
                        self._flush_acks(None)
                        break
                    self._backoff(failures, exc)
                    continue
                self._served = False
                try:
                    self._serve(consumer)
                except Exception as exc:
                    self.consuming.clear()
                    metrics.ERRORS.labels(self.queue, "broker").inc()
                    failures = 1 if self._served else failures + 1
                    self._close(consumer)
                    self.reconnects += 1
                    self._backoff(failures, exc)
                else:
                    self._close(consumer)
        finally:
            self.consuming.clear()
            self._work.put(None)

    def _serve(self, consumer: Any) -> None:
        """Read one consumer until stopping leaves nothing in hand; raises when the consumer fails."""
        self._flush_acks(consumer)  # acks a lost consumer could not send (by message id: Redis, stub)
        while True:
            self._collect_finished()
            self._flush_acks(consumer)
            if self.stopping.is_set() and self._in_flight is None:
                self._give_back(consumer)
                return
            message = next(consumer)
            self._served = True
            if not self.consuming.is_set():
                self.consuming.set()
                self._wake.set()  # heartbeat at once: the worker is back
            if message is None:
                self._dispatch()
                continue
            self._accept(consumer, message)
            self._flush_acks(consumer)
            if len(self._pending) >= self.max_batch:
                self._dispatch()

    def _accept(self, consumer: Any, message: Any) -> None:
        """A new delivery: handled inline, acked as a redelivery, held while its job runs, or queued for work."""
        if self.inline(message):
            self._to_ack.append((consumer, message))
            return
        job_id = self.job_id(message)
        if job_id is not None:
            if job_id in self.done:
                log.info("job %s was already run: acking its redelivery (message %s)", job_id, message.message_id)
                self._to_ack.append((consumer, message))
                return
            if job_id in self.running:
                log.info(
                    "job %s is running: its redelivery (message %s) is acked when it ends", job_id, message.message_id
                )
                self._held.setdefault(job_id, []).append((consumer, message))
                return
            self.running.add(job_id)
        self._pending.append((consumer, message))

    def _dispatch(self) -> None:
        """Hand the received messages (up to ``max_batch``) to the work thread if it is idle."""
        if self._in_flight is not None or not self._pending or self.stopping.is_set():
            return
        batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
        self._in_flight = batch
        self._work.put(batch)

    def _collect_finished(self) -> None:
        """Take back what the work thread has finished: its messages, and redeliveries held for them, get acked."""
        while True:
            try:
                batch = self._finished.get_nowait()
            except queue.Empty:
                return
            for delivery in batch:
                self._to_ack.append(delivery)
                job_id = self.job_id(delivery[1])
                if job_id is not None:
                    self._to_ack.extend(self._held.pop(job_id, []))
                    self.running.discard(job_id)
            self._in_flight = None

    def _flush_acks(self, consumer: Any | None) -> None:
        """Ack on the live consumer, oldest first; an ack that raises stays for the next consumer.

        A RabbitMQ delivery tag belongs to its connection: a message delivered by a consumer since closed was
        requeued by the server (its redelivery is acked instead), and acking its tag on the new channel would ack
        another message. Redis and the stub broker ack by message id, so those acks are sent on any consumer.
        """
        while self._to_ack:
            origin, message = self._to_ack[0]
            if consumer is None:
                log.warning("no broker connection: message %s is not acked", message.message_id)
            elif origin is not consumer and self._rabbitmq:
                log.info("message %s came from a lost connection: RabbitMQ has requeued it", message.message_id)
            else:
                consumer.ack(message)
            self._to_ack.pop(0)

    def _give_back(self, consumer: Any) -> None:
        """On stop: messages received but not started go back to the queue for other workers."""
        unique: dict[str, Any] = {}
        for _, message in [*self._pending, *(d for held in self._held.values() for d in held)]:
            unique.setdefault(message.message_id, message)
        self._pending, self._held = [], {}
        self.running.clear()
        if unique:
            log.info("stopping: giving back %d messages not started", len(unique))
            try:
                consumer.requeue(list(unique.values()))
            except Exception:
                log.exception("could not requeue %d messages", len(unique))

    def _work_running(self) -> bool:
        """Whether the work thread still has a batch it has not handed back."""
        return self._in_flight is not None and self._finished.empty()

    def _close(self, consumer: Any) -> None:
        try:
            consumer.close()
        except Exception:
            log.debug("closing a broken consumer failed", exc_info=True)

    def _backoff(self, failures: int, exc: BaseException) -> None:
        """Wait before re-creating the consumer: 0.5 s, 1 s, 2 s ... at most 10 s (work in hand keeps running)."""
        delay = min(RECONNECT_FIRST_SECONDS * 2 ** (failures - 1), RECONNECT_MAX_SECONDS)
        log.warning(
            "the consumer of %s failed (%s: %s); reconnecting in %.1f s", self.queue, type(exc).__name__, exc, delay
        )
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not (self.stopping.is_set() and not self._work_running()):
            time.sleep(0.05)

    # --- the work thread -------------------------------------------------------------------------------------------
    def _work_loop(self) -> None:
        """Run each batch the consumer thread hands over, then hand it back for acking."""
        while True:
            batch = self._work.get()
            if batch is None:
                return
            try:
                self.run_batch([message for _, message in batch])
            except Exception:
                log.exception("a batch failed outside any job")
            finally:
                self._finished.put(batch)
