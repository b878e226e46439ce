"""Checkpoints by URL (contract §9.4): checks at request time, then the download job through a real broker."""

import hashlib
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apps.models_registry import tasks
from apps.models_registry.models import Checkpoint
from esd.storage import blob_store
from tests.conftest import Api, wait_until

MiB = 1024 * 1024
MODEL = os.urandom(11 * MiB + 123)


class Handler(BaseHTTPRequestHandler):
    """Routes: a model file, a 404, a text file, a huge file, a liar, a failing GET, redirects."""

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, length: int | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self):
        self.route()

    def do_GET(self):
        self.route()

    def route(self):
        port = self.server.server_address[1]
        if self.path == "/files/model.safetensors":
            self._send(200, MODEL)
        elif self.path == "/files/readme.txt":
            self._send(200, b"hello")
        elif self.path == "/files/huge.safetensors":
            self._send(200, b"", length=50 * MiB) if self.command == "HEAD" else self._send(500)
        elif self.path == "/files/liar.safetensors":
            # Advertises nothing on HEAD, then streams more than the cap.
            if self.command == "HEAD":
                self.send_response(200)
                self.end_headers()
            else:
                self._send(200, os.urandom(3 * MiB))
        elif self.path == "/files/flaky.safetensors":
            self._send(200, b"", length=10) if self.command == "HEAD" else self._send(503)
        elif self.path == "/to-private":
            self._send(302, headers={"Location": f"http://127.0.0.2:{port}/files/model.safetensors"})
        elif self.path == "/to-model":
            self._send(301, headers={"Location": "/files/model.safetensors"})
        else:
            self._send(404)


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("0.0.0.0", 0), Handler)  # noqa: S104 - 127.0.0.2 must reach it too
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def private_ok(settings):
    settings.ESD_CHECKPOINT_URL_ALLOW_PRIVATE = True


def create(api: Api, key: str, *urls: str):
    return api.post(
        "checkpoints", {"checkpoint_type": "Lora", "params": {"message": "from url"}, "urls": list(urls)}, key=key
    )


def test_download_streams_into_the_store_in_parts(api: Api, admin_key, origin, private_ok, store, worker, monkeypatch):
    monkeypatch.setattr(tasks, "PART_BYTES", 5 * MiB)  # 11 MiB in three parts
    answer = create(api, admin_key, f"{origin}/to-model", f"{origin}/to-model")
    assert answer.status == 202, answer.body
    assert answer.body["message"] == "Checkpoint creation in progress, please check later"
    [item] = answer.body["data"]["checkpoints"]  # duplicate URLs dropped
    assert item["status"] == "Initial" and item["type"] == "Lora"
    checkpoint = wait_until(lambda: Checkpoint.objects.filter(pk=item["id"], status="Active").first())
    assert (checkpoint.bytes_done, checkpoint.bytes_total) == (len(MODEL), len(MODEL))
    data = blob_store().read_bytes(f"{checkpoint.prefix}/model.safetensors")
    assert hashlib.sha256(data).digest() == hashlib.sha256(MODEL).digest()
    listed = api.get("checkpoints", key=admin_key).body["data"]["checkpoints"][0]
    assert listed["name"] == ["model.safetensors"] and listed["params"]["message"] == "from url"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/files/missing.safetensors", "url {u} is not reachable"),
        ("/files/readme.txt", "file readme.txt from url {u} has an unsupported extension"),
        ("/files/huge.safetensors", "url {u} is too large"),
    ],
)
def test_request_time_checks(api: Api, admin_key, origin, private_ok, disk_store, settings, path, message):
    settings.ESD_CHECKPOINT_URL_MAX_BYTES = 10 * MiB
    url = f"{origin}{path}"
    answer = create(api, admin_key, url)
    assert answer.body == {"statusCode": 400, "message": message.format(u=url)}
    assert not Checkpoint.objects.exists()


def test_private_addresses_are_refused_by_default(api: Api, admin_key, origin, disk_store):
    url = f"{origin}/files/model.safetensors"
    assert create(api, admin_key, url).body == {"statusCode": 400, "message": f"url {url} is not allowed"}
    local = url.replace("127.0.0.1", "localhost")
    assert create(api, admin_key, local).body == {"statusCode": 400, "message": f"url {local} is not allowed"}
    assert create(api, admin_key, "file:///etc/passwd").body["message"] == "url file:///etc/passwd is not allowed"


def test_redirect_to_a_private_address_is_refused(api: Api, admin_key, origin, disk_store, settings):
    settings.ESD_CHECKPOINT_URL_ALLOWED_NETWORKS = ["127.0.0.1/32"]  # an allowed mirror; the guard stays on
    url = f"{origin}/to-private"
    assert create(api, admin_key, url).body == {"statusCode": 400, "message": f"url {url} is not allowed"}
    assert create(api, admin_key, f"{origin}/to-model").status == 202  # the same host without the hop is fine


def test_name_is_reserved_from_the_start(api: Api, admin_key, origin, private_ok, disk_store):
    assert create(api, admin_key, f"{origin}/files/model.safetensors").status == 202
    answer = create(api, admin_key, f"{origin}/to-model")
    assert answer.body["message"] == "model.safetensors already exists, please use another or rename/delete exists"


def test_body_over_the_cap_disables_without_retrying(api: Api, admin_key, origin, private_ok, store, worker, settings):
    settings.ESD_CHECKPOINT_URL_MAX_BYTES = 1 * MiB
    item = create(api, admin_key, f"{origin}/files/liar.safetensors").body["data"]["checkpoints"][0]
    checkpoint = wait_until(lambda: Checkpoint.objects.filter(pk=item["id"], status="Disabled").first())
    assert "larger than" in checkpoint.error
    assert list(blob_store().list(checkpoint.prefix + "/")) == []
    listed = api.get("checkpoints", key=admin_key).body["data"]["checkpoints"][0]
    assert listed["params"]["error"] == checkpoint.error


def test_failing_download_is_disabled_after_three_tries(
    api: Api, admin_key, origin, private_ok, store, worker, monkeypatch
):
    monkeypatch.setitem(tasks.download_checkpoint.options, "min_backoff", 20)
    monkeypatch.setitem(tasks.download_checkpoint.options, "max_backoff", 40)
    item = create(api, admin_key, f"{origin}/files/flaky.safetensors").body["data"]["checkpoints"][0]
    checkpoint = wait_until(lambda: Checkpoint.objects.filter(pk=item["id"], status="Disabled").first())
    assert checkpoint.error.startswith("download failed after 3 tries")
