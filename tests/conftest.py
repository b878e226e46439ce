"""Shared fixtures. The cast: ``admin`` (IT Operator), ``designer`` (a narrow role), ``outsider`` (no role).

Every API call goes through Django's test client against the real database with real keys; nothing about
authentication, permissions or validation is mocked.
"""

from __future__ import annotations

import functools
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.cache import cache
from django.test import Client

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import Role, User
from apps.accounts.permissions import ALL_PERMISSIONS
from apps.accounts.services import issue_api_key, save_role
from esd.storage import BlobStore, blob_store

PREFIX = "/api/"


def pytest_report_header(config) -> list[str]:
    return [
        f"DATABASE_URL: {'set' if os.environ.get('DATABASE_URL') else 'unset (SQLite)'}",
        f"DRAMATIQ_BROKER_URL: {os.environ.get('DRAMATIQ_BROKER_URL') or 'unset (in-process StubBroker)'}",
    ]


@pytest.fixture(autouse=True)
def _clear_caches():
    """ContentType ids and API keys are cached per process; every test starts from what its database says."""
    ContentType.objects.clear_cache()
    cache.clear()
    yield
    ContentType.objects.clear_cache()
    cache.clear()


@pytest.fixture(autouse=True)
def _seed_after_flush(request):
    """Every database test starts with the seed data. Transactional tests (live server, worker threads) end by
    flushing every table, and test order is not guaranteed to put them last (session-scoped parametrization, such
    as pytest-playwright's browser name, regroups tests), so put the seed back whenever it is missing."""
    marker = request.node.get_closest_marker("django_db")
    names = set(request.fixturenames)
    transactional = bool(marker and marker.kwargs.get("transaction")) or bool(
        {"transactional_db", "live_server"} & names
    )
    if transactional:
        request.getfixturevalue("transactional_db")
    elif marker is not None or "db" in names:
        request.getfixturevalue("db")
    else:
        return
    from django.apps import apps

    from apps.accounts.models import Role, esd_permission_queryset
    from apps.accounts.seed import seed

    if not Role.objects.filter(name="IT Operator").exists() or esd_permission_queryset().count() < 18:
        seed(apps)


@functools.cache
def published_operations() -> list[tuple[re.Pattern[str], dict]]:
    """The OpenAPI document the server publishes, as (path regex, path item) pairs, with every ``$ref`` inlined
    and OpenAPI's ``nullable`` written as JSON Schema's null type, so responses can be checked by jsonschema."""
    from drf_spectacular.generators import SchemaGenerator

    document = SchemaGenerator().get_schema(request=None, public=True)
    components = document.get("components", {}).get("schemas", {})

    def plain(node: Any) -> Any:
        if isinstance(node, list):
            return [plain(item) for item in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return plain(components[node["$ref"].rsplit("/", 1)[1]])
        out = {k: plain(v) for k, v in node.items() if k not in ("nullable", "example", "readOnly", "writeOnly")}
        if node.get("nullable"):
            kind = out.get("type")
            out["type"] = [*(kind if isinstance(kind, list) else [kind] if kind else []), "null"] if kind else None
            if out["type"] is None:
                out.pop("type")
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        return out

    operations = []
    for template, item in document["paths"].items():
        regex = re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template.rstrip("/"))) + "/?$")
        operations.append((regex, plain(item)))
    return operations


def check_against_schema(method: str, path: str, answer: Any) -> None:
    """Every JSON response a test receives must match what the published document says for its route and
    status; a documented route answering with an undocumented status fails too."""
    from jsonschema import Draft4Validator

    for regex, item in published_operations():
        if regex.match(path) and method.lower() in item:
            responses = item[method.lower()].get("responses", {})
            declared = responses.get(str(answer.status))
            if declared is None:
                raise AssertionError(f"{method} {path} answered {answer.status}, which its schema does not list")
            schema = (declared.get("content", {}).get("application/json") or {}).get("schema")
            if schema is not None:
                validator = declared.get("_validator") or declared.setdefault("_validator", Draft4Validator(schema))
                errors = sorted(validator.iter_errors(answer.body), key=str)
                if errors:
                    raise AssertionError(
                        f"{method} {path} {answer.status} does not match its published schema: {errors[0].message} "
                        f"at {list(errors[0].absolute_path)}"
                    )
            return


@dataclass
class Answer:
    """A response, with the body parsed when there is one."""

    status: int
    body: Any
    headers: Any
    raw: bytes


class Api:
    """Calls the ESD API as a client would: JSON bodies on any method, key and username in headers."""

    def __init__(self, client: Client):
        self.client = client
        published_operations()  # built once per session, before any test starts timing its calls

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = None,
        username: str | None = None,
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
        params: dict[str, Any] | None = None,
    ) -> Answer:
        extra = dict(headers or {})
        if key is not None:
            extra["x-api-key"] = key
        if username is not None:
            extra["username"] = username
        data = raw_body if raw_body is not None else (b"" if body is None else json.dumps(body).encode())
        url = path if path.startswith("/") else PREFIX + path
        kwargs: dict[str, Any] = {"headers": extra}
        if params:
            url += "?" + urlencode(params, doseq=True)
        response = self.client.generic(method, url, data, content_type="application/json", **kwargs)
        content = response.content
        parsed = (
            json.loads(content) if content and response.get("Content-Type", "").startswith("application/json") else None
        )
        answer = Answer(response.status_code, parsed, response.headers, content)
        if url.startswith(PREFIX) and parsed is not None:
            check_against_schema(method, url.split("?")[0], answer)
        return answer

    def get(self, path: str, **kw: Any) -> Answer:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("PUT", path, body, **kw)

    def delete(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.call("DELETE", path, body, **kw)


@pytest.fixture
def api(client: Client) -> Api:
    return Api(client)


def make_user(
    username: str, *, roles: tuple[str, ...] = (), password: str | None = None, creator: str = "admin", **fields: Any
) -> User:
    user = User(username=username, creator=creator, **fields)
    if password is None:
        user.set_unusable_password()
    else:
        user.set_password(password)
    user.save()
    user.groups.set(Role.objects.filter(name__in=roles))
    return user


def make_role(name: str, permissions: list[str], creator: str = "admin") -> Role:
    role, _ = save_role(
        actor=creator, actor_permissions=ALL_PERMISSIONS, name=name, permissions=permissions, checked=False
    )
    return role


def make_key(user: User, kind: str = ApiKeyKind.PERSONAL, **kw: Any) -> str:
    return issue_api_key(user, kind=kind, **kw)[1]


@pytest.fixture
def admin(db) -> User:
    return make_user("admin", roles=("IT Operator",), password="admin-password-1")


@pytest.fixture
def admin_key(admin: User) -> str:
    return make_key(admin)


@pytest.fixture
def designer(db) -> User:
    make_role("Designer", ["inference:all", "checkpoint:list", "train:all"])
    return make_user("designer", roles=("Designer",), password="designer-password-1")


@pytest.fixture
def designer_key(designer: User) -> str:
    return make_key(designer)


@pytest.fixture
def outsider(db) -> User:
    return make_user("outsider", password="outsider-password-1")


@pytest.fixture
def outsider_key(outsider: User) -> str:
    return make_key(outsider)


@pytest.fixture
def service_key(admin: User) -> str:
    """A trusted front end's key (the WebUI extension), owned by an IT Operator as the contract advises."""
    return make_key(admin, ApiKeyKind.SERVICE)


# --- storage ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server():
    """One moto server for the session: the S3 (and later SageMaker) API over real HTTP on loopback."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def use_store(settings, mode: str, *, tmp_path, live_server=None, moto_url: str | None = None) -> BlobStore:
    """Point the blob store at a fresh local folder served by the live server, or at a fresh moto bucket."""
    from esd.aws import client, reset_clients
    from esd.storage import _store

    _store.cache_clear()
    reset_clients()
    settings.ESD_VAR_DIR = tmp_path
    settings.ESD_STORAGE = mode
    settings.ESD_BUCKET = f"esd-{uuid.uuid4().hex[:12]}"
    if mode == "s3":
        settings.AWS_ENDPOINT_URL = moto_url
        settings.S3_PUBLIC_ENDPOINT_URL = ""
        client("s3").create_bucket(Bucket=settings.ESD_BUCKET)
    elif live_server is not None:
        settings.ESD_PUBLIC_URL = live_server.url
    return blob_store()


@pytest.fixture(params=["local", "s3"])
def store(request, settings, tmp_path) -> BlobStore:
    """The blob store in each mode: local behind the live test server, S3 on moto."""
    if request.param == "s3":
        yielded = use_store(settings, "s3", tmp_path=tmp_path, moto_url=request.getfixturevalue("moto_server"))
    else:
        yielded = use_store(settings, "local", tmp_path=tmp_path, live_server=request.getfixturevalue("live_server"))
    yield yielded
    from esd.aws import reset_clients
    from esd.storage import _store

    _store.cache_clear()
    reset_clients()


@pytest.fixture
def disk_store(settings, tmp_path) -> BlobStore:
    """The local store without a server: for tests that never fetch its URLs (and keep a rolled-back db)."""
    store = use_store(settings, "local", tmp_path=tmp_path, live_server=None)
    yield store
    from esd.storage import _store

    _store.cache_clear()


@pytest.fixture
def local_store(settings, tmp_path, live_server) -> BlobStore:
    store = use_store(settings, "local", tmp_path=tmp_path, live_server=live_server)
    yield store
    from esd.storage import _store

    _store.cache_clear()


# --- background work ---------------------------------------------------------------------------------------------


@pytest.fixture
def worker(transactional_db):
    """A dramatiq worker on the configured broker (in-process, or Redis in CI), consuming every queue."""
    import dramatiq
    from dramatiq import Worker

    from esd.tasks import control_queues, load_actor_modules

    load_actor_modules()
    broker = dramatiq.get_broker()
    broker.flush_all()
    running = Worker(broker, queues=control_queues(), worker_threads=2, worker_timeout=100)
    running.start()
    yield running
    stop_worker(running)
    broker.flush_all()


def stop_worker(running) -> None:
    """Stop a test worker for good: dramatiq leaves a stopped worker's middleware on the broker, which would
    keep subscribing it to queues declared later (and strand their messages)."""
    running.stop()
    broker = running.broker
    broker.middleware[:] = [m for m in broker.middleware if getattr(m, "worker", None) is not running]


def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


# --- the runtime stack: tiny models, gpu_runtime workers, self-hosted endpoints ---------------------------------------


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("diffusers")
    from gpu_runtime.tiny import build_tiny_pipeline, write_tiny_lora, write_tiny_model

    root = tmp_path_factory.mktemp("inference-models")
    return {
        "model": write_tiny_model(root / "tiny.safetensors"),
        "lora": _lora(write_tiny_lora, build_tiny_pipeline, root / "style.safetensors"),
    }


def _lora(write, build, path: Path) -> Path:
    write(build(seed=0), path, seed=3)
    return path


@pytest.fixture
def registered(tiny_models, local_store):
    """The tiny model and a LoRA as Active checkpoints everyone may use."""
    from apps.models_registry.services import import_file

    import_file(tiny_models["model"], checkpoint_type="Stable-diffusion", owners=[])
    import_file(tiny_models["lora"], checkpoint_type="Lora", owners=[])
    return tiny_models


def endpoint_body(endpoint_type: str, name: str):
    return {
        "endpoint_type": endpoint_type,
        "instance_type": "cpu",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["IT Operator", "Designer"],
        "creator": "admin",
        "endpoint_name": name,
    }


@pytest.fixture
def gpu(settings, tmp_path):
    """Start gpu_runtime workers for endpoints (the same code a GPU host runs), stopped after the test."""
    pytest.importorskip("diffusers")
    import dramatiq

    from gpu_runtime.engine import Engine
    from gpu_runtime.worker import GpuWorker

    engine = Engine(tmp_path / "runtime", device="cpu")
    started = []

    def start(endpoint_name: str) -> GpuWorker:
        worker = GpuWorker(
            dramatiq.get_broker(),
            engine,
            endpoint_name,
            events_queue=settings.ESD_EVENTS_QUEUE,
            instance_type="cpu",
            poll_ms=20,
        )
        worker.start()
        started.append(worker)
        return worker

    start.started = started  # the workers started so far (a test may look at one's engine)
    start.engine = engine  # the one engine they share
    yield start
    for worker in started:
        worker.stop(timeout=60)


@pytest.fixture
def endpoints(api: Api, admin_key, settings, worker, gpu, registered, tmp_path):
    """An Async and a Real-time self-hosted endpoint, InService with a worker each."""
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    names = {}
    for endpoint_type, short in (("Async", "a1"), ("Real-time", "r1")):
        answer = api.post("endpoints", endpoint_body(endpoint_type, short), key=admin_key)
        assert answer.status == 202, answer.body
        names[endpoint_type] = answer.body["data"]["endpoint_name"]
        gpu(names[endpoint_type])
    from apps.endpoints.models import Endpoint

    for name in names.values():
        wait_until(lambda n=name: Endpoint.objects.filter(name=n, status="InService").exists())
    return {**names, "tmp": tmp_path}
