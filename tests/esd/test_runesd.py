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


def test_embedded_server_generates_an_image_end_to_end(tmp_path):
    """The README walkthrough: make run's server, the tiny model, a self-hosted endpoint, one API call."""
    import io
    import json

    import pytest

    pytest.importorskip("diffusers")
    from PIL import Image

    env = {**os.environ, "ESD_VAR_DIR": str(tmp_path), "DJANGO_SETTINGS_MODULE": "esd.settings", "HF_HUB_OFFLINE": "1"}
    for name in ("DATABASE_URL", "DRAMATIQ_BROKER_URL", "SECRET_KEY", "ESD_API_PREFIX", "ESD_PUBLIC_URL"):
        env.pop(name, None)
    manage = [sys.executable, str(ROOT / "manage.py")]
    run = lambda *args: subprocess.run(args, env=env, check=True, capture_output=True, text=True, cwd=ROOT)  # noqa: E731
    run(*manage, "migrate", "--noinput")
    key = run(*manage, "create_api_key", "api").stdout.strip().splitlines()[-1]
    model = tmp_path / "tiny.safetensors"
    run(sys.executable, "-m", "gpu_runtime", "make-tiny-model", str(model))
    run(*manage, "import_checkpoint", str(model), "--type", "Stable-diffusion")
    port = free_port()
    proc = subprocess.Popen(
        [*manage, "runesd", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base, headers = f"http://127.0.0.1:{port}/api", {"x-api-key": key}
    try:
        wait_for(port, proc)
        created = requests.post(
            f"{base}/endpoints",
            headers=headers,
            timeout=30,
            json={
                "endpoint_type": "Real-time",
                "instance_type": "cpu",
                "initial_instance_count": 1,
                "autoscaling_enabled": False,
                "assign_to_roles": ["IT Operator"],
                "creator": "api",
                "endpoint_name": "demo",
            },
        )
        assert created.status_code == 202, created.text
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = requests.get(f"{base}/endpoints", headers=headers, timeout=30).json()["data"]["endpoints"]
            if listed[0]["endpoint_status"] == "InService":
                break
            time.sleep(0.5)
        assert listed[0]["endpoint_status"] == "InService"
        params = {"prompt": "a photo of a cat", "steps": 4, "width": 64, "height": 64, "seed": 1}
        answer = requests.post(
            f"{base}/inferences",
            headers=headers,
            timeout=120,
            json={
                "task_type": "txt2img",
                "inference_type": "Real-time",
                "models": {"Stable-diffusion": ["tiny.safetensors"]},
                "payload_string": json.dumps(params),
            },
        )
        assert answer.status_code == 200, answer.text
        image_url = answer.json()["data"]["img_presigned_urls"][0]
        image = Image.open(io.BytesIO(requests.get(image_url, timeout=30).content))
        assert (image.format, image.size) == ("PNG", (64, 64))
        # one process, one /metrics: the control plane's numbers and the in-process GPU worker's
        root = f"http://127.0.0.1:{port}"
        assert requests.get(f"{root}/readyz", timeout=30).json()["message"] == "ready"
        metrics = requests.get(f"{root}/metrics", timeout=30).text
        assert 'esd_inference_jobs{endpoint="esd-real-time-demo",status="succeed"} 1.0' in metrics
        assert 'esd_runtime_images_total{queue="esd-real-time-demo"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "self-hosted endpoints served here on cpu" in output
