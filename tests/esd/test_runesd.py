"""`make run`'s server: `runesd` serves the API for real (waitress), here under the `prod/` prefix ESD clients use."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"runesd exited early:\n{proc.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("runesd did not start listening")


def test_runesd_serves_the_api_with_a_key_from_create_api_key(tmp_path):
    env = {
        **os.environ,
        "ESD_VAR_DIR": str(tmp_path),
        "ESD_API_PREFIX": "prod/",
        "DJANGO_SETTINGS_MODULE": "esd.settings",
    }
    # The embedded mode on a fresh machine: no database or broker configured.
    for name in ("DATABASE_URL", "DRAMATIQ_BROKER_URL", "SECRET_KEY"):
        env.pop(name, None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput"], env=env, check=True, capture_output=True, cwd=ROOT)
    created = subprocess.run(
        [*manage, "create_api_key", "api"], env=env, check=True, capture_output=True, text=True, cwd=ROOT
    )
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = subprocess.Popen(
        [*manage, "runesd", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(port, proc)
        base = f"http://127.0.0.1:{port}"
        ping = requests.get(f"{base}/prod/ping", headers={"x-api-key": key}, timeout=10)
        assert (ping.status_code, ping.json()) == (200, {"statusCode": 200, "message": "pong"})
        assert ping.headers["x-api-version"] == "1.5.0"
        assert ping.headers["Server"] == "ESD Server"
        users = requests.get(f"{base}/prod/users/", headers={"x-api-key": key}, timeout=10)
        assert [u["username"] for u in users.json()["data"]["users"]] == ["api"]
        assert requests.get(f"{base}/api/ping", headers={"x-api-key": key}, timeout=10).status_code == 404
        assert requests.get(f"{base}/prod/docs/", timeout=10).status_code == 200
        assert requests.get(f"{base}/admin/login/", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "re-enqueued 0 unfinished job(s)" in output
    assert "actors    in this process on StubBroker" in output
    assert "create_api_key" in output  # tells a newcomer how to get a key
    assert (tmp_path / "db.sqlite3").exists() and (tmp_path / "secret_key").exists()
