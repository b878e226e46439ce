"""``/healthz`` and ``/readyz`` of the web process: alive without dependencies; ready only when the database,
the migrations, the broker and the storage answer, with the failing part named in a 503; the reasons only for
the callers ``/metrics`` serves; one round of checks at a time, cached, each check bounded, none piling up.

The database cases run the real settings in a child process whose ``DATABASE_URL`` points at a closed port (or
at an empty SQLite file, or a port that never answers), because a test's own database connection cannot be
re-pointed in place."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from esd import monitoring

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_readiness():
    """Every test starts without a cached answer (they change the broker, the storage, the checks)."""
    monitoring.forget_readiness()
    yield
    monitoring.forget_readiness()


def silent_port() -> socket.socket:
    """A listening socket that never accepts: connects succeed (the kernel's backlog), nothing ever answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def counting(check: Callable[[], None], delay: float = 0.0) -> tuple[Callable[[], None], list]:
    """The real check, counting its runs (and taking ``delay`` longer, to make a round overlap others)."""
    runs: list[float] = []

    def run() -> None:
        runs.append(time.monotonic())
        time.sleep(delay)
        check()

    return run, runs


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe_in_child(path: str, tmp_path: Path, remote_addr: str = "127.0.0.1", **env: str) -> tuple[int, dict]:
    """GET ``path`` from ``remote_addr`` in a fresh Django process configured by ``env`` (the settings read the
    environment)."""
    code = (
        "import json, django; django.setup(); from django.test import Client; "
        f"r = Client().get({path!r}, REMOTE_ADDR={remote_addr!r}); "
        "print(json.dumps([r.status_code, json.loads(r.content)]))"
    )
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "esd.settings_test",
        "ESD_VAR_DIR": str(tmp_path / "var"),
        "ESD_READY_TIMEOUT": "5",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    status, body = json.loads(done.stdout.strip().splitlines()[-1])
    return status, body


def test_healthz_needs_nothing_and_answers_any_host(client):
    # a kubelet probes by pod address over plain HTTP: no ALLOWED_HOSTS, no redirect, no database
    answer = client.get("/healthz", HTTP_HOST="10.1.2.3:8000")
    assert answer.status_code == 200
    assert answer.json() == {"statusCode": 200, "message": "alive"}
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db
def test_readyz_is_200_when_every_part_answers(client, store):
    answer = client.get("/readyz", HTTP_HOST="10.1.2.3:8000")
    assert answer.status_code == 200, answer.json()
    assert answer.json() == {
        "statusCode": 200,
        "message": "ready",
        "checks": {"database": "ok", "migrations": "ok", "broker": "ok", "storage": "ok"},
    }


@pytest.mark.django_db
@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_readyz_names_the_broker_when_it_is_stopped(client, settings, scheme):
    settings.DRAMATIQ_BROKER_URL = f"{scheme}://127.0.0.1:{closed_port()}/"
    answer = client.get("/readyz")
    assert answer.status_code == 503
    body = answer.json()
    assert body["statusCode"] == 503 and body["message"] == "not ready: broker"
    assert body["checks"]["database"] == body["checks"]["storage"] == "ok"
    assert body["checks"]["broker"] != "ok"


@pytest.mark.django_db
def test_readyz_names_the_storage_when_s3_does_not_answer(client, settings):
    settings.ESD_STORAGE = "s3"
    settings.AWS_ENDPOINT_URL = f"http://127.0.0.1:{closed_port()}"
    settings.ESD_READY_TIMEOUT = 2
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["message"] == "not ready: storage"


def test_readyz_names_the_database_when_it_is_stopped(tmp_path):
    status, body = probe_in_child(
        "/readyz", tmp_path, DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port()}/esd", DRAMATIQ_BROKER_URL=""
    )
    assert status == 503
    assert body["message"] == "not ready: database, migrations"
    assert "connection" in body["checks"]["database"].lower()
    assert body["checks"]["migrations"] == "not checked: the database is unreachable"
    assert body["checks"]["broker"] == body["checks"]["storage"] == "ok"
    # from the internet: which parts fail, not psycopg's text (it names the host, its address and the user)
    port = closed_port()
    status, body = probe_in_child(
        "/readyz", tmp_path, "8.8.8.8", DATABASE_URL=f"postgres://esd@127.0.0.1:{port}/esd", DRAMATIQ_BROKER_URL=""
    )
    assert (status, body) == (
        503,
        {
            "statusCode": 503,
            "message": "not ready: database, migrations",
            "checks": {"database": "failing", "migrations": "failing", "broker": "ok", "storage": "ok"},
        },
    )
    # alive all the same: liveness must not restart a process because its database is down
    status, body = probe_in_child(
        "/healthz", tmp_path, DATABASE_URL=f"postgres://postgres@127.0.0.1:{closed_port()}/esd", DRAMATIQ_BROKER_URL=""
    )
    assert (status, body) == (200, {"statusCode": 200, "message": "alive"})


def test_readyz_names_unapplied_migrations(tmp_path):
    status, body = probe_in_child(
        "/readyz", tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'empty.sqlite3'}", DRAMATIQ_BROKER_URL=""
    )
    assert status == 503
    assert body["message"] == "not ready: migrations"
    assert body["checks"]["database"] == "ok"
    assert "unapplied migration(s): " in body["checks"]["migrations"]


def test_the_database_check_gives_up_on_a_server_that_never_answers(tmp_path):
    # libpq waits forever for a connect by default: the check's own connection has a connect_timeout
    with silent_port() as sock:
        port = sock.getsockname()[1]
        code = (
            "import time, django; django.setup(); from esd.monitoring import check_database; t = time.monotonic()\n"
            "try:\n    check_database()\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, round(time.monotonic() - t, 1))"
        )
        environment = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "esd.settings_test",
            "ESD_VAR_DIR": str(tmp_path / "var"),
            "ESD_READY_TIMEOUT": "1",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{port}/esd",
            "DRAMATIQ_BROKER_URL": "",
        }
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stderr[-3000:]
    kind, seconds = done.stdout.split()
    assert kind == "OperationalError"
    assert float(seconds) < 30  # a bound, not a speed: libpq's floor is 2 s; without a timeout this never returns


def test_the_storage_check_gives_up_on_an_s3_that_never_answers(settings):
    # botocore's defaults (60 s read, several attempts) would hold the probe's thread for minutes
    with silent_port() as sock:
        settings.ESD_STORAGE = "s3"
        settings.AWS_ENDPOINT_URL = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings.ESD_READY_TIMEOUT = 1
        started = time.monotonic()
        with pytest.raises(Exception, match=r"[Tt]imeout|timed out"):
            monitoring.check_storage()
        # a bound, not a speed: one attempt of 1 s each way (botocore's defaults would take minutes); the slack is
        # for a busy machine creating its first boto3 client
        assert time.monotonic() - started < 30


@pytest.mark.django_db
def test_readyz_answers_from_its_cache_and_runs_one_round_at_a_time(client, settings, monkeypatch):
    settings.ESD_READY_CACHE_SECONDS = 5
    database, runs = counting(monitoring.check_database)
    monkeypatch.setitem(monitoring.READINESS_CHECKS, "database", database)
    first, second = client.get("/readyz"), client.get("/readyz")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert len(runs) == 1  # two quick calls: one round of checks

    # uncached: callers arriving while a round runs wait for it (or get the last answer), they do not start others
    settings.ESD_READY_CACHE_SECONDS = 0
    monitoring.forget_readiness()
    runs.clear()
    slow, runs = counting(monitoring.check_database, delay=0.5)
    monkeypatch.setitem(monitoring.READINESS_CHECKS, "database", slow)
    answers: list[dict] = []
    callers = [threading.Thread(target=lambda: answers.append(monitoring.readiness())) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    assert len(answers) == 8 and all(answer["database"] is None for answer in answers)
    assert len(runs) == 1
    # the cache expired: the next caller runs a new round
    monitoring.readiness()
    assert len(runs) == 2


@pytest.mark.django_db
def test_a_passed_migrations_check_is_trusted_for_a_while(client, settings, monkeypatch):
    settings.ESD_READY_CACHE_SECONDS = 0
    settings.ESD_READY_MIGRATIONS_SECONDS = 60
    migrations, runs = counting(monitoring.check_migrations)
    monkeypatch.setitem(monitoring.READINESS_CHECKS, "migrations", migrations)
    for _ in range(3):
        assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
    assert len(runs) == 1  # loading every migration file once, not at every probe
    settings.ESD_READY_MIGRATIONS_SECONDS = 0  # a new deploy may add migrations: checked again once it is stale
    assert client.get("/readyz").json()["checks"]["migrations"] == "ok"
    assert len(runs) == 2


@pytest.mark.django_db
def test_a_hung_check_is_not_started_again_and_threads_do_not_pile_up(client, settings, monkeypatch):
    settings.ESD_READY_CACHE_SECONDS = 0
    settings.ESD_READY_TIMEOUT = 0.3
    release = threading.Event()
    monkeypatch.setitem(monitoring.READINESS_CHECKS, "broker", lambda: release.wait(30))
    try:
        started = time.monotonic()
        answers = [client.get("/readyz") for _ in range(6)]
        elapsed = time.monotonic() - started
        hung = [thread for thread in threading.enumerate() if thread.name == "readyz-broker"]
        assert len(hung) == 1  # six probes, one thread for the hung check
        assert all(answer.status_code == 503 for answer in answers)
        assert {answer.json()["message"] for answer in answers} == {"not ready: broker"}
        assert answers[0].json()["checks"]["broker"] == "no answer within 0.3 s"
        assert "still running" in answers[-1].json()["checks"]["broker"]
        assert elapsed < 6 * 0.3 + 10  # a bound: every probe answers (blocked on the hung check, none would)
    finally:
        release.set()
    hung[0].join(5)
    assert client.get("/readyz").status_code == 200  # once it answers, the next round checks the broker again


@pytest.mark.django_db
def test_only_the_metrics_readers_get_the_reasons(client, settings):
    settings.DRAMATIQ_BROKER_URL = f"redis://127.0.0.1:{closed_port()}/"
    settings.ESD_READY_CACHE_SECONDS = 0
    settings.ESD_METRICS_TOKEN = ""
    bare = {
        "statusCode": 503,
        "message": "not ready: broker",
        "checks": {"database": "ok", "migrations": "ok", "broker": "failing", "storage": "ok"},
    }
    assert client.get("/readyz", REMOTE_ADDR="8.8.8.8").json() == bare
    assert client.get("/readyz", HTTP_X_REAL_IP="8.8.8.8").json() == bare  # a proxy on the same host
    internal = client.get("/readyz", REMOTE_ADDR="10.0.0.5").json()
    assert internal["message"] == "not ready: broker"
    assert "Connection" in internal["checks"]["broker"] and "127.0.0.1" in internal["checks"]["broker"]

    settings.ESD_METRICS_TOKEN = "s3cret-token"
    assert client.get("/readyz", REMOTE_ADDR="10.0.0.5").json() == bare  # a token is set: the token decides
    detailed = client.get("/readyz", REMOTE_ADDR="8.8.8.8", HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert detailed.status_code == 503
    assert detailed.json()["checks"]["broker"] == internal["checks"]["broker"]
