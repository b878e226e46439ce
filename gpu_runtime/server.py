"""SageMaker container mode: ``GET /ping`` and ``POST /invocations`` with the same request and output as the
queue worker, so the same runtime image can back a SageMaker endpoint (real-time or async).

Each request has its own thread (``/ping`` must answer while an image is being made, or SageMaker replaces the
container), but invocations take turns on the one engine: it owns one device and a pipeline cache that is not
safe to use from two threads, so a second invocation waits for the first instead of running beside it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gpu_runtime import protocol
from gpu_runtime.errors import JobError

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024 * 1024


def make_server(engine: Any, host: str = "0.0.0.0", port: int = 8080) -> ThreadingHTTPServer:  # noqa: S104
    """An HTTP server for the SageMaker container contract; invocations are serialised on ``engine``."""
    turn = threading.Lock()  # one invocation at a time on the engine; /ping never waits for it

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

        def _answer(self, status: int, body: dict | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/ping":
                self._answer(200, {"status": "healthy"})
            else:
                self._answer(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/invocations":
                self._answer(404, {"error": "not found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._answer(413, {"error": "request too large"})
                return
            job_id = self.headers.get("X-Amzn-SageMaker-Inference-Id") or str(uuid.uuid4())
            try:
                request = protocol.validate_request(json.loads(self.rfile.read(length) or b"null"))
                with turn:
                    prepared = engine.prepare(job_id, request)
                    output = engine.run([prepared])[0]
                self._answer(200, output)
            except (JobError, protocol.ProtocolError, ValueError) as exc:
                self._answer(200, {"error": str(exc)})
            except Exception as exc:
                log.exception("invocation %s failed", job_id)
                self._answer(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    return ThreadingHTTPServer((host, port), Handler)
