"""``/metrics`` (Prometheus), ``/healthz`` (alive) and ``/readyz`` (dependencies) of the web process.

Why a middleware, first in the stack: probes come from Kubernetes or a load balancer by pod address, over plain
HTTP, so they must be answered before ``ALLOWED_HOSTS``, the SSL redirect or sessions get a say; and none of them
may touch the API's envelope or authentication.

Why metrics are computed at scrape time from the database: gunicorn runs several processes, and counters kept in
each would give every scrape a different, partial answer. Each app registers a collector (``apps/<app>/metrics.py``,
found the way ``esd.tasks`` finds actors) that runs a few aggregate queries (GROUP BY), so every process answers
the same and a scrape costs the same however many jobs there are. One collector failing (its database down) does
not fail the scrape: ``esd_scrape_collector_success{collector}`` says which.

Protection: with ``ESD_METRICS_TOKEN`` set, ``/metrics`` wants ``Authorization: Bearer <token>``; without it, only
loopback and private addresses are served, and never a request a proxy forwarded (it carries the proxy's address).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from esd.discovery import import_app_modules

log = logging.getLogger("esd.monitoring")

PROBE_PATHS = ("/metrics", "/healthz", "/readyz")

_COLLECTORS: dict[str, Callable[[], Iterable[Metric]]] = {}
_loaded = threading.Lock()
_modules_loaded = False


def metrics_collector(name: str) -> Callable[[Callable[[], Iterable[Metric]]], Callable[[], Iterable[Metric]]]:
    """Register a function yielding metric families, run at every scrape of ``/metrics``."""

    def register(func: Callable[[], Iterable[Metric]]) -> Callable[[], Iterable[Metric]]:
        _COLLECTORS[name] = func
        return func

    return register


def load_metrics_modules() -> None:
    """Import every app's ``metrics`` module once, so its collectors are registered before the first scrape."""
    global _modules_loaded
    with _loaded:
        if _modules_loaded:
            return
        import_app_modules("metrics")
        _modules_loaded = True


class _Collectors:
    """The registered collectors as one prometheus_client collector, each guarded (see the module docstring)."""

    def collect(self) -> Iterable[Metric]:
        success = GaugeMetricFamily(
            "esd_scrape_collector_success",
            "Whether a collector answered this scrape (0: see the log)",
            labels=["collector"],
        )
        for name, func in sorted(_COLLECTORS.items()):
            try:
                families = list(func())
            except Exception:
                log.exception("metrics collector %s failed", name)
                success.add_metric([name], 0)
                continue
            success.add_metric([name], 1)
            yield from families
        yield success


REGISTRY = CollectorRegistry(auto_describe=False)
REGISTRY.register(_Collectors())


def render_metrics(accept: str = "") -> tuple[bytes, str]:
    """The exposition (OpenMetrics when the scraper asks for it) and its content type."""
    load_metrics_modules()
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


# --- protection ----------------------------------------------------------------------------------------------------


def metrics_refusal(request: HttpRequest) -> tuple[int, str] | None:
    """Why this request may not read ``/metrics`` (status, message), or None when it may."""
    token = settings.ESD_METRICS_TOKEN
    if token:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return 401, "metrics need an Authorization: Bearer token (ESD_METRICS_TOKEN)"
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            return 403, "the metrics token is not valid"
        return None
    if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
        return 403, "metrics are not served through a proxy without ESD_METRICS_TOKEN"
    address = request.META.get("REMOTE_ADDR", "")
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return 403, f"metrics are served to internal addresses only without ESD_METRICS_TOKEN, not {address!r}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_private:
        return None
    return 403, f"metrics are served to internal addresses only without ESD_METRICS_TOKEN, not {address}"


# --- readiness -----------------------------------------------------------------------------------------------------


def check_database() -> None:
    """A query answers (on this thread's own connection, closed afterwards)."""
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


def check_migrations() -> None:
    """Every migration the code has is applied (a rolling deploy must not send traffic to a newer schema's code
    before ``migrate`` ran)."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    finally:
        connection.close()
    if plan:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in plan[:5])
        raise RuntimeError(f"{len(plan)} unapplied migration(s): {names}{' ...' if len(plan) > 5 else ''}")


def check_broker() -> None:
    """The broker of ``DRAMATIQ_BROKER_URL`` answers (Redis PING, an AMQP connection); the in-process broker of
    the embedded mode always does."""
    url = settings.DRAMATIQ_BROKER_URL
    timeout = settings.ESD_READY_TIMEOUT
    if not url:
        return
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return
    import pika

    parameters = pika.URLParameters(url)
    parameters.socket_timeout = timeout
    parameters.stack_timeout = timeout
    parameters.blocked_connection_timeout = timeout
    parameters.connection_attempts = 1
    pika.BlockingConnection(parameters).close()


def check_storage() -> None:
    from esd.storage import blob_store

    blob_store().check()


READINESS_CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database,
    "migrations": check_migrations,
    "broker": check_broker,
    "storage": check_storage,
}


def readiness() -> dict[str, str | None]:
    """Every check at once, each within ``ESD_READY_TIMEOUT`` seconds: part -> None when fine, else why not.

    A check that hangs is abandoned (its thread finishes on its own), so the probe answers in bounded time."""
    timeout = settings.ESD_READY_TIMEOUT
    pool = ThreadPoolExecutor(max_workers=len(READINESS_CHECKS), thread_name_prefix="readyz")
    futures = {name: pool.submit(check) for name, check in READINESS_CHECKS.items()}
    results: dict[str, str | None] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            results[name] = None
        except FutureTimeout:
            results[name] = f"no answer within {timeout} s"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"[:500]
    pool.shutdown(wait=False)
    if results["database"] and results["migrations"]:
        results["migrations"] = "not checked: the database is unreachable"
    return results


# --- the middleware ------------------------------------------------------------------------------------------------


def _json(body: dict, status: int) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


class ProbeMiddleware:
    """Answers ``GET /metrics``, ``/healthz`` and ``/readyz`` before anything else runs (see the module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        path = request.path_info.rstrip("/") or "/"
        if path not in PROBE_PATHS:
            return self.get_response(request)
        if request.method not in ("GET", "HEAD"):
            return _json({"statusCode": 405, "message": f"{request.method} is not allowed on {path}"}, 405)
        if path == "/healthz":
            return _json({"statusCode": 200, "message": "alive"}, 200)
        if path == "/readyz":
            results = readiness()
            failing = [name for name, problem in results.items() if problem]
            status = 503 if failing else 200
            body = {
                "statusCode": status,
                "message": f"not ready: {', '.join(failing)}" if failing else "ready",
                "checks": {name: problem or "ok" for name, problem in results.items()},
            }
            if failing:
                log.warning("not ready: %s", body["checks"])
            return _json(body, status)
        refusal = metrics_refusal(request)
        if refusal is not None:
            status, message = refusal
            response = _json({"statusCode": status, "message": message}, status)
            if status == 401:
                response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        data, content_type = render_metrics(request.headers.get("Accept", ""))
        response = HttpResponse(data, content_type=content_type)
        response["Cache-Control"] = "no-store"
        return response
