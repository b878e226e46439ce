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
The same rule decides who reads ``/readyz``'s reasons: everyone else learns only which parts fail, never the
exception text (a driver's message names hosts, addresses and database users).

Why ``/readyz`` is cached and single-flight: it is reachable without credentials, and each round connects to the
database, the broker and the store. One round runs at a time and its answer serves every caller for
``ESD_READY_CACHE_SECONDS``; each check runs on at most one thread, so a check that hangs (a broker that accepts
the connection and never answers) is reported as hanging by later rounds instead of being started again, and
threads cannot pile up during an outage.
"""

from __future__ import annotations

import copy
import functools
import hmac
import ipaddress
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

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

# Headers a reverse proxy or load balancer adds. Without a token, a request carrying any of them is refused: the
# address it comes from is the proxy's (often loopback or private), not the client's. Not every proxy sets
# X-Forwarded-For (X-Real-IP only, Via only), and an L4 balancer with SNAT sets none at all: hence the startup
# warning below, and the advice to set ESD_METRICS_TOKEN in production.
PROXY_HEADERS = (
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "Via",
    "X-Forwarded-Host",
    "X-Forwarded-Proto",
    "X-Forwarded-Port",
    "X-Forwarded-Server",
    "X-Original-Forwarded-For",
    "True-Client-IP",
    "CF-Connecting-IP",
)
_warned_without_token = False


def warn_without_token() -> None:
    """Once per process, outside DEBUG: say that ``/metrics`` relies on addresses alone (see ``PROXY_HEADERS``)."""
    global _warned_without_token
    if _warned_without_token or settings.DEBUG or settings.ESD_METRICS_TOKEN:
        return
    _warned_without_token = True
    log.warning(
        "ESD_METRICS_TOKEN is not set: /metrics and the reasons of /readyz are served to any loopback or private "
        "address; behind a proxy or load balancer that adds no forwarding header, that is every client. "
        "Set ESD_METRICS_TOKEN in production."
    )


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
    forwarded = next((name for name in PROXY_HEADERS if name in request.headers), None)
    if forwarded is not None:
        return 403, f"metrics are not served through a proxy without ESD_METRICS_TOKEN (the request has {forwarded})"
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

_POSTGRES_ENGINES = ("django.db.backends.postgresql", "django.contrib.gis.db.backends.postgis")


@contextmanager
def _probe_connection() -> Iterator:
    """A connection of its own to the default database, bounded by ``ESD_READY_TIMEOUT`` (libpq waits forever for
    a connect by default, SQLite 20 s for a lock), closed afterwards: the request's own connection and its
    settings are left alone."""
    from django.db import connections
    from django.db.utils import load_backend

    timeout = settings.ESD_READY_TIMEOUT
    settings_dict = copy.deepcopy(connections["default"].settings_dict)
    options = settings_dict.setdefault("OPTIONS", {})
    postgres = settings_dict["ENGINE"] in _POSTGRES_ENGINES
    if postgres:
        options["connect_timeout"] = max(1, math.ceil(timeout))
    elif settings_dict["ENGINE"] == "django.db.backends.sqlite3":
        options["timeout"] = timeout
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, "default")
    try:
        if postgres:
            with wrapper.cursor() as cursor:
                cursor.execute("SET statement_timeout = %s", [max(1, int(timeout * 1000))])
        yield wrapper
    finally:
        wrapper.close()


def check_database() -> None:
    """A query answers, on a connection of its own with a connect and a statement timeout."""
    with _probe_connection() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def check_migrations() -> None:
    """Every migration the code has is applied (a rolling deploy must not send traffic to a newer schema's code
    before ``migrate`` ran). Loading every migration file is the dear part: ``readiness`` skips this check for
    ``ESD_READY_MIGRATIONS_SECONDS`` after it passed."""
    from django.db.migrations.executor import MigrationExecutor

    with _probe_connection() as connection:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
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


@functools.lru_cache(maxsize=4)
def _s3_probe_client(bucket: str, endpoint: str | None, region: str, timeout: float):
    """An S3 client for the check only: botocore's defaults (60 s connect and read, several attempts) would hold
    a probe thread for minutes; this one gives up after one attempt of ``timeout`` seconds. Credentials come
    from the store's own session, so the check proves what the server uses."""
    from botocore.config import Config

    from esd.storage import blob_store

    storage = blob_store().storage
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    session = storage._create_session()  # django-storages' one place for keys, token and profile
    return session.client(
        "s3", region_name=region, endpoint_url=endpoint, use_ssl=storage.use_ssl, verify=storage.verify, config=config
    )


def check_storage() -> None:
    """The blob store answers: S3 ``HeadBucket`` with short timeouts and no retry, the local folder writable."""
    from esd.storage import S3BlobStore, blob_store

    store = blob_store()
    if isinstance(store, S3BlobStore):
        client = _s3_probe_client(
            store.bucket, settings.AWS_ENDPOINT_URL or None, settings.AWS_REGION, float(settings.ESD_READY_TIMEOUT)
        )
        client.head_bucket(Bucket=store.bucket)
        return
    store.check()


READINESS_CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database,
    "migrations": check_migrations,
    "broker": check_broker,
    "storage": check_storage,
}


class _Attempt:
    """One run of one check on its own daemon thread (daemon: a hung check never holds the process at exit)."""

    def __init__(self, name: str, check: Callable[[], None]):
        self.done = threading.Event()
        self.error: str | None = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(check,), name=f"readyz-{name}", daemon=True)
        self.thread.start()

    def _run(self, check: Callable[[], None]) -> None:
        try:
            check()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self.done.set()


class _Readiness:
    """The last round's answer, the round under way, the checks still running and the migrations' last pass
    (see the module docstring)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: tuple[float, dict[str, str | None]] | None = None
        self.in_flight: threading.Event | None = None
        self.running: dict[str, _Attempt] = {}
        self.migrations_passed_at: float | None = None

    def round(self) -> dict[str, str | None]:
        """Every check at once, within ``ESD_READY_TIMEOUT`` seconds in all. Only one round runs at a time."""
        timeout = settings.ESD_READY_TIMEOUT
        recheck = settings.ESD_READY_MIGRATIONS_SECONDS
        deadline = time.monotonic() + timeout
        results: dict[str, str | None] = {}
        attempts: dict[str, _Attempt] = {}
        for name, check in READINESS_CHECKS.items():
            passed = self.migrations_passed_at if name == "migrations" else None
            if passed is not None and time.monotonic() - passed < recheck:
                results[name] = None
                continue
            previous = self.running.get(name)
            if previous is not None and not previous.done.is_set():
                age = time.monotonic() - previous.started
                results[name] = f"no answer within {timeout} s (still running after {age:.0f} s)"
                continue
            attempts[name] = self.running[name] = _Attempt(name, check)
        for name, attempt in attempts.items():
            if attempt.done.wait(max(0.0, deadline - time.monotonic())):
                results[name] = attempt.error
                del self.running[name]
            else:
                results[name] = f"no answer within {timeout} s"
        if "migrations" in attempts and results["migrations"] is None:
            self.migrations_passed_at = time.monotonic()
        if results["database"] and results["migrations"]:
            results["migrations"] = "not checked: the database is unreachable"
        results = {name: results[name] for name in READINESS_CHECKS}
        failing = {name: problem for name, problem in results.items() if problem}
        if failing:
            log.warning("not ready: %s", failing)
        return results

    def get(self) -> dict[str, str | None]:
        """The answer of a round at most ``ESD_READY_CACHE_SECONDS`` old; while a round runs, the previous
        answer (or, before any, the one under way)."""
        with self.lock:
            now = time.monotonic()
            if self.last is not None and now - self.last[0] < settings.ESD_READY_CACHE_SECONDS:
                return self.last[1]
            waiting = self.in_flight
            if waiting is not None and self.last is not None:
                return self.last[1]
            if waiting is None:
                mine = self.in_flight = threading.Event()
        if waiting is not None:
            waiting.wait(settings.ESD_READY_TIMEOUT + 1)
            with self.lock:
                if self.last is not None:
                    return self.last[1]
            return {name: "not checked: another check is under way" for name in READINESS_CHECKS}
        results = None
        try:
            results = self.round()
            return results
        finally:
            with self.lock:
                if results is not None:
                    self.last = (time.monotonic(), results)
                self.in_flight = None
            mine.set()


_READINESS = _Readiness()


def readiness() -> dict[str, str | None]:
    """Part -> None when fine, else why not: the database, the migrations, the broker and the storage, cached
    for ``ESD_READY_CACHE_SECONDS`` (see the module docstring)."""
    return _READINESS.get()


def forget_readiness() -> None:
    """Drop the cached answer and the migrations' pass (tests; a check still running is left to finish)."""
    with _READINESS.lock:
        _READINESS.last = None
        _READINESS.migrations_passed_at = None
    _s3_probe_client.cache_clear()


# --- the middleware ------------------------------------------------------------------------------------------------


def _json(body: dict, status: int) -> HttpResponse:
    response = HttpResponse(json.dumps(body), status=status, content_type="application/json")
    response["Cache-Control"] = "no-store"
    return response


class ProbeMiddleware:
    """Answers ``GET /metrics``, ``/healthz`` and ``/readyz`` before anything else runs (see the module docstring)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response
        warn_without_token()

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
            detailed = metrics_refusal(request) is None  # the reasons name hosts and users: /metrics' readers only
            body = {
                "statusCode": status,
                "message": f"not ready: {', '.join(failing)}" if failing else "ready",
                "checks": {
                    name: "ok" if not problem else problem if detailed else "failing"
                    for name, problem in results.items()
                },
            }
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
