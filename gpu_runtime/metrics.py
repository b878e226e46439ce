"""The runtime's own Prometheus metrics and probes: ``--metrics-port`` serves ``/metrics``, ``/healthz``, ``/readyz``.

The registry is this module's, not prometheus_client's global one and never the control plane's: the embedded
server runs GPU workers inside the web process, and its Django ``/metrics`` must not change shape because of them.
Metrics are process-wide (one engine per process); those about a queue carry a ``queue`` label, because the embedded
server runs one worker per endpoint in one process.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

IMAGES = Counter("esd_runtime_images", "Images the worker generated", ["queue"], registry=REGISTRY)
JOBS = Counter(
    "esd_runtime_jobs", "Jobs the worker finished, by outcome (ok|failed)", ["queue", "outcome"], registry=REGISTRY
)
ERRORS = Counter(
    "esd_runtime_errors",
    "Errors by kind: rejected (a request refused before running), job (the engine refused or failed a job), "
    "internal (an unexpected exception), upload (the output could not be stored), broker (the consumer failed and "
    "was re-created), event (an event could not be sent)",
    ["queue", "kind"],
    registry=REGISTRY,
)
ITERATIONS = Counter(
    "esd_runtime_iterations", "Sampler iterations run (all images of a call)", ["queue"], registry=REGISTRY
)
ITERATIONS_PER_SECOND = Gauge(
    "esd_runtime_iterations_per_second",
    "Sampler iterations per second of the last engine call",
    ["queue"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "esd_runtime_batch_size",
    "Images per engine call (compatible queued jobs run as one batched call)",
    ["queue"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
RUN_SECONDS = Histogram(
    "esd_runtime_job_run_seconds",
    "A job's time on the worker, from pickup to its result",
    ["queue"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Histogram(
    "esd_runtime_model_load_seconds",
    "Loading a checkpoint into pipelines (a cache miss)",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
    registry=REGISTRY,
)


def vram_bytes() -> float:
    """GPU memory torch holds for tensors now (all CUDA devices); 0 without CUDA. torch is only looked at once a
    component has imported it: a scrape must never be what imports torch."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return 0.0
        return float(sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())))
    except Exception:  # a broken driver must not break the scrape
        return 0.0


VRAM = Gauge("esd_runtime_vram_bytes", "GPU memory allocated by torch (0 without CUDA)", registry=REGISTRY)
VRAM.set_function(vram_bytes)

Checks = Callable[[], dict[str, str | None]]
"""Readiness: part name -> None when fine, else why not (the 503 names it)."""


def probe_answer(path: str, checks: Checks) -> tuple[int, str, bytes]:
    """(status, content type, body) of ``/metrics``, ``/healthz`` or ``/readyz``; 404 for anything else."""
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
    if path == "/healthz":
        return 200, "application/json", json.dumps({"statusCode": 200, "message": "alive"}).encode()
    if path == "/readyz":
        try:
            results = checks()
        except Exception as exc:  # a check that raises is itself a failure, named
            results = {"checks": f"{type(exc).__name__}: {exc}"}
        failing = [name for name, problem in results.items() if problem]
        body = {
            "statusCode": 503 if failing else 200,
            "message": f"not ready: {', '.join(failing)}" if failing else "ready",
            "checks": {name: problem or "ok" for name, problem in results.items()},
        }
        return body["statusCode"], "application/json", json.dumps(body).encode()
    return 404, "application/json", json.dumps({"statusCode": 404, "message": f"{path} not found"}).encode()


def serve(port: int, checks: Checks, host: str = "0.0.0.0") -> ThreadingHTTPServer:  # noqa: S104 - scraped in-cluster
    """Serve the probes on a daemon thread (each request its own thread: a long job never delays a probe)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

        def do_GET(self) -> None:
            status, content_type, body = probe_answer(self.path.split("?", 1)[0], checks)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="runtime-metrics", daemon=True).start()
    log.info("metrics and probes on %s:%s (/metrics /healthz /readyz)", host, server.server_address[1])
    return server
