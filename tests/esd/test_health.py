"""``/healthz`` and ``/readyz`` of the web process: alive without dependencies; ready only when the database,
the migrations, the broker and the storage answer, with the failing part named in a 503.

The database cases run the real settings in a child process whose ``DATABASE_URL`` points at a closed port (or
at an empty SQLite file), because a test's own database connection cannot be re-pointed in place."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe_in_child(path: str, tmp_path: Path, **env: str) -> tuple[int, dict]:
    """GET ``path`` in a fresh Django process configured by ``env`` (the settings read the environment)."""
    code = (
        "import json, django; django.setup(); from django.test import Client; "
        f"r = Client().get({path!r}); print(json.dumps([r.status_code, json.loads(r.content)]))"
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
