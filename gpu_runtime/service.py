"""What the GPU worker and the training worker share: stopping, signals, events, and redelivery memory.

Both read a queue through dramatiq's consumer API (not a dramatiq ``Worker``), report on the control plane's events
queue, and must treat a redelivered message for a job they already finished as a no-op. Keeping that here means a
fix to, say, graceful shutdown reaches both.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import OrderedDict
from typing import Any

import dramatiq

from gpu_runtime import protocol

log = logging.getLogger(__name__)

REMEMBERED_JOBS = 1000


class QueueService:
    """Base of the workers: subclasses add threads to ``self.threads`` in ``start``."""

    def __init__(self, broker: dramatiq.Broker, events_queue: str) -> None:
        self.broker = broker
        self.events_queue = events_queue
        self.stopping = threading.Event()
        self.done: OrderedDict[str, None] = OrderedDict()  # recently finished job ids: redelivery is a no-op
        self.threads: list[threading.Thread] = []
        broker.declare_queue(events_queue)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work in hand, then stop (SIGTERM does this)."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)

    def run_forever(self) -> None:
        """Serve until SIGTERM/SIGINT, then finish the work in hand (the CLI commands)."""

        def graceful(signum: int, frame: Any) -> None:
            log.info("signal %s: finishing the work in hand, then stopping", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)
        self.start()
        while not self.stopping.is_set():
            self.stopping.wait(1)
        self.stop()

    def send(self, event: dict) -> None:
        """Put one event on the events queue for the control plane's ``runtime_event`` actor."""
        protocol.validate_event(event)
        message = dramatiq.Message(
            queue_name=self.events_queue, actor_name=protocol.RUNTIME_EVENT, args=(event,), kwargs={}, options={}
        )
        self.broker.enqueue(message)

    def send_quietly(self, event: dict) -> None:
        """Send, logging a failure: a lost event is recovered by the control plane's sweeps, a crash is not."""
        try:
            self.send(event)
        except Exception:
            log.exception("could not send event %s", event.get("kind"))

    def remember_done(self, job_id: str) -> None:
        self.done[job_id] = None
        while len(self.done) > REMEMBERED_JOBS:
            self.done.popitem(last=False)
