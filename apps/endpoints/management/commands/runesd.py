"""The embedded server: HTTP and the background actors in one process, for one machine and no services."""

from __future__ import annotations

import os
import signal
import sys

import dramatiq
from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from dramatiq import Worker

from esd.tasks import control_queues, load_actor_modules, recover_unfinished_work, start_periodic


class Command(BaseCommand):
    help = "Run ESD Server: a threaded WSGI server (waitress) plus dramatiq worker threads in this process."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--threads", type=int, default=8, help="HTTP worker threads")
        parser.add_argument(
            "--no-worker",
            action="store_true",
            help="Serve HTTP only (when separate `manage.py rundramatiq` processes consume a real broker).",
        )

    def handle(self, *args, **options) -> None:
        from waitress import serve

        from esd.wsgi import application

        if not os.environ.get("ESD_PUBLIC_URL"):
            # Signed local-storage URLs must point at this very server.
            host = "127.0.0.1" if options["host"] in ("0.0.0.0", "::", "") else options["host"]  # noqa: S104
            settings.ESD_PUBLIC_URL = f"http://{host}:{options['port']}"
        load_actor_modules()
        broker = dramatiq.get_broker()
        worker = None
        if not options["no_worker"]:
            # Only the control plane's queues: endpoint and training queues belong to GPU workers.
            worker = Worker(
                broker,
                queues=control_queues(),
                worker_threads=settings.ESD_EMBEDDED_WORKER_THREADS,
                worker_timeout=50,  # idle queues are polled every 50 ms: results are picked up at once
            )
            worker.start()
        counts = recover_unfinished_work()
        start_periodic()
        runtime = None
        if not options["no_worker"] and settings.ESD_EMBEDDED_GPU_WORKER:
            from apps.endpoints.embedded import EmbeddedRuntime, runtime_available

            if runtime_available():
                runtime = EmbeddedRuntime(settings.ESD_EMBEDDED_GPU_DEVICE)
                runtime.start()
            else:
                self.stdout.write("gpu_runtime is not installed: self-hosted endpoints need external workers")
        total = sum(c for c in counts.values() if c > 0)
        self.stdout.write(f"re-enqueued {total} unfinished job(s) {counts or ''}".rstrip())
        self._banner(options["host"], options["port"], broker, worker is not None, runtime)

        def stop(signum, frame):  # SIGTERM (systemd, docker) stops as cleanly as Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            serve(
                application,
                host=options["host"],
                port=options["port"],
                threads=options["threads"],
                ident="ESD Server",
                # Signed local storage URLs take ESD's 1000 MiB parts; the API itself is capped by the app.
                max_request_body_size=64 * 1024**3,
                # Read sockets in 1 MiB chunks: the 8 KiB default costs ~2 s of CPU per GiB uploaded.
                recv_bytes=1024 * 1024,
                channel_timeout=300,
            )
        except KeyboardInterrupt:
            pass
        finally:
            if runtime is not None:
                runtime.stop()
            if worker is not None:
                worker.stop(timeout=10_000)
            self.stdout.write("stopped")

    def _banner(self, host: str, port: int, broker: dramatiq.Broker, worker: bool, runtime) -> None:
        base = f"http://{host}:{port}"
        python = sys.executable
        gpu = f"self-hosted endpoints served here on {runtime.engine.device}" if runtime else "external workers"
        prefix = settings.ESD_API_PREFIX
        self.stdout.write(
            "\n".join(
                [
                    f"ESD Server listening on {base}",
                    f"  API       {base}/{prefix}   (docs {base}/{prefix}docs/)",
                    f"  console   {base}/admin/",
                    f"  actors    {'in this process' if worker else 'not here (--no-worker)'}"
                    f" on {type(broker).__name__}",
                    f"  data      {settings.ESD_VAR_DIR}",
                    f"  GPU work  {gpu}",
                    "First steps (in another terminal):",
                    f"  log in:   {python} manage.py createsuperuser   then open {base}/admin/",
                    f"  API key:  {python} manage.py create_api_key <username>",
                    f"  try it:   curl -H 'x-api-key: <key>' {base}/{prefix}ping",
                    "",
                ]
            )
        )
        self.stdout.flush()
