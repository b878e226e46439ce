"""GPU workers inside the embedded server: one ``gpu_runtime`` worker per live self-hosted endpoint, sharing one
engine on this machine's GPU or CPU, and a trainer on the training queue, so a single ``make run`` process can
generate images and train LoRAs.

It follows the endpoints table: a worker starts for each new self-hosted endpoint (its heartbeats bring the
endpoint InService) and stops when the endpoint is deleted.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)
SYNC_SECONDS = 3


def runtime_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class EmbeddedRuntime:
    def __init__(self, device: str = "auto"):
        from gpu_runtime.engine import Engine

        self.engine = Engine(settings.ESD_VAR_DIR / "runtime", device=device)
        self.workers: dict[str, Any] = {}
        self.trainer: Any = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="embedded-runtime", daemon=True)

    def start(self) -> None:
        from esd.monitoring import metrics_collector
        from gpu_runtime import metrics as runtime_metrics
        from gpu_runtime.training_worker import TrainingWorker

        # One process serves everything here: its /metrics includes the runtime's (esd_runtime_*).
        metrics_collector("runtime")(runtime_metrics.REGISTRY.collect)

        # Trainings queue up on the same machine; a LoRA run on a CPU takes long but needs no other host.
        self.trainer = TrainingWorker(
            dramatiq.get_broker(),
            settings.ESD_VAR_DIR / "runtime",
            queue=settings.ESD_TRAINING_QUEUE,
            events_queue=settings.ESD_EVENTS_QUEUE,
            device=self.engine.device,
        )
        self.trainer.start()
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=SYNC_SECONDS * 2)
        for worker in self.workers.values():
            worker.stop(timeout=60)
        if self.trainer is not None:
            self.trainer.stop(timeout=60)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("embedded runtime: could not follow the endpoints")
            finally:
                close_old_connections()
            self.stopping.wait(SYNC_SECONDS)

    def sync(self) -> None:
        from apps.endpoints.models import Endpoint
        from gpu_runtime.worker import GpuWorker

        wanted = set(Endpoint.objects.live().filter(backend="self-hosted").values_list("name", flat=True))
        for name in wanted - set(self.workers):
            worker = GpuWorker(
                dramatiq.get_broker(),
                self.engine,
                name,
                events_queue=settings.ESD_EVENTS_QUEUE,
                instance_type=f"embedded-{self.engine.device}",
                worker_id=f"embedded/{name}",
            )
            worker.start()
            self.workers[name] = worker
            log.info("embedded runtime: serving %s on %s", name, self.engine.device)
        for name in set(self.workers) - wanted:
            self.workers.pop(name).stop(timeout=60)
