"""Webhooks: a job that ends is POSTed, signed, to its owner's (and their roles') URLs by a real dramatiq worker,
retried with backoff when the receiver fails, and never sent to an address the SSRF guard refuses.

The receiver is a real HTTP server on 127.0.0.1 in a thread; loopback is admitted only through
``ESD_WEBHOOK_ALLOWED_NETWORKS``, as an operator would admit an internal network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.accounts import webhooks
from apps.accounts.models import Role, Webhook, WebhookDelivery
from apps.inference import services as inference
from apps.inference.models import InferenceJob
from apps.training import training
from apps.training.models import TrainingJob
from esd import keys
from esd.api.errors import BadRequest
from esd.fetch import Guard, UrlNotReachable, post
from esd.storage import blob_store
from esd.tasks import control_queues, queue_backlog
from tests.conftest import Api, make_key, make_user, wait_until

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n not really an image").decode()


@dataclass
class Received:
    path: str
    headers: Message
    body: bytes


class Receiver:
    """What arrived, in order; ``plan`` lists the statuses to answer next (then 200)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.plan: list[int] = []
        self.error_body = b"nope"  # what a non-2xx answer carries
        self.hold: threading.Event | None = None  # when set: answer only once it is set
        self.lock = threading.Lock()
        self.url = ""

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver():
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with received.lock:
                received.requests.append(Received(self.path, self.headers, body))
                status = received.plan.pop(0) if received.plan else 200
            if received.hold is not None:
                received.hold.wait(30)
            reply = received.error_body if status >= 300 else b"fine"
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    received.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield received
    server.shutdown()
    server.server_close()


@pytest.fixture
def allow_loopback(settings):
    """Loopback admitted as an operator admits an internal network; retries back off in milliseconds."""
    settings.ESD_WEBHOOK_ALLOW_PRIVATE = False
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    settings.ESD_WEBHOOK_MIN_BACKOFF_MS = 50
    settings.ESD_WEBHOOK_MAX_BACKOFF_MS = 200
    settings.ESD_WEBHOOK_TIMEOUT = 5
    return settings


def running_inference(owner: str) -> InferenceJob:
    return InferenceJob.objects.create(
        task_type="txt2img",
        inference_type="Async",
        owner=owner,
        endpoint_name="esd-async-a",
        backend="self-hosted",
        status="inprogress",
        payload_string=json.dumps({"prompt": "a cat"}),
    )


def succeed(job: InferenceJob) -> None:
    """The runtime's result arrives: the real ingestion marks the job ``succeed``."""
    inference.ingest_output(str(job.id), json.dumps({"images": [PNG], "info": "{}", "parameters": {}}).encode())


def valid_signature(secret: str, received: Received) -> bool:
    """The receiver's side, written from the README's description rather than with our helper."""
    parts = dict(item.split("=", 1) for item in received.headers["X-ESD-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + received.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


def without_signatures(data):
    """Presigned URLs carry their own expiry time: compare where they point, not when they were signed."""
    if isinstance(data, dict):
        return {k: without_signatures(v) for k, v in data.items()}
    if isinstance(data, list):
        return [without_signatures(v) for v in data]
    if isinstance(data, str) and data.startswith("http") and "?" in data:
        return urlsplit(data)._replace(query="").geturl()
    return data


def delivered(hook: Webhook, count: int = 1) -> list[WebhookDelivery]:
    return wait_until(
        lambda: (
            rows
            if len(rows := list(hook.deliveries.filter(status__in=("delivered", "failed")).order_by("created_at")))
            >= count
            else None
        )
    )


# --- delivery ----------------------------------------------------------------------------------------------------


def test_an_ended_inference_arrives_once_signed_with_the_job_as_get_returns_it(
    api: Api, designer, worker, receiver, allow_loopback, disk_store
):
    hook = webhooks.create_webhook(url=f"{receiver.url}/hook", user=designer, by="designer")
    job = running_inference("designer")
    succeed(job)

    [delivery] = delivered(hook)
    assert delivery.status == "delivered" and delivery.attempts == 1 and delivery.last_status_code == 200
    [got] = receiver.at("/hook")
    assert valid_signature(hook.secret, got)
    assert not valid_signature("another-secret", got)
    assert got.headers["X-ESD-Event"] == "inference.ended" and got.headers["X-ESD-Delivery"] == str(delivery.id)
    assert got.headers["Content-Type"] == "application/json"
    body = json.loads(got.body)
    assert body["event"] == "inference.ended" and body["id"] == str(delivery.id) and body["created"]
    shown = api.get(f"inferences/{job.id}", key=make_key(designer)).body["data"]
    assert body["data"]["status"] == "succeed" and body["data"]["image_names"] == ["image_0.png"]
    assert without_signatures(body["data"]) == without_signatures(shown)

    # Exactly once: nothing else arrives, and sending the delivered delivery again sends nothing.
    time.sleep(0.5)
    assert webhooks.attempt(str(delivery.id)) == webhooks.DELIVERED
    assert len(receiver.requests) == 1
    delivery.refresh_from_db()
    assert delivery.attempts == 1


def test_an_ended_training_arrives_with_the_job_as_get_returns_it(
    api: Api, designer, worker, receiver, allow_loopback, disk_store
):
    hook = webhooks.create_webhook(url=f"{receiver.url}/train", user=designer)
    job = TrainingJob.objects.create(
        id=uuid.uuid4(),
        owner="designer",
        backend="self-hosted",
        status="Training",
        params={"config_params": {"saving_arguments": {"output_name": "style"}}},
    )
    blob_store().put_bytes(f"{keys.training_output(str(job.id))}/style.safetensors", b"weights")
    training.finish(str(job.id), "Completed")

    [delivery] = delivered(hook)
    assert delivery.status == "delivered" and delivery.event == "training.ended" and delivery.job_id == str(job.id)
    [got] = receiver.at("/train")
    assert valid_signature(hook.secret, got) and got.headers["X-ESD-Event"] == "training.ended"
    body = json.loads(got.body)
    shown = api.get(f"trainings/{job.id}", key=make_key(designer)).body["data"]
    assert body["data"]["job_status"] == "Completed"
    assert without_signatures(body["data"]) == without_signatures(shown)


def test_a_server_answering_500_first_gets_the_delivery_again_after_a_backoff(
    designer, worker, receiver, allow_loopback, disk_store
):
    hook = webhooks.create_webhook(url=f"{receiver.url}/flaky", user=designer)
    receiver.plan = [500]
    inference.fail_job(str(running_inference("designer").id), {"error": "out of memory"})

    [delivery] = delivered(hook)
    assert delivery.status == "delivered" and delivery.attempts == 2 and delivery.last_status_code == 200
    first, second = receiver.at("/flaky")
    assert first.body == second.body  # the same delivery, byte for byte, signed anew
    assert valid_signature(hook.secret, first) and valid_signature(hook.secret, second)
    assert first.headers["X-ESD-Delivery"] == second.headers["X-ESD-Delivery"] == str(delivery.id)
    assert json.loads(second.body)["data"]["status"] == "failed"


def test_client_errors_fail_at_once_and_server_errors_give_up_after_the_attempts(
    designer, worker, receiver, allow_loopback, disk_store
):
    allow_loopback.ESD_WEBHOOK_MAX_ATTEMPTS = 3
    gone = webhooks.create_webhook(url=f"{receiver.url}/gone", user=designer, events=["inference.ended"])
    receiver.plan = [404]
    inference.fail_job(str(running_inference("designer").id), {"error": "x"})
    [delivery] = delivered(gone)
    assert delivery.status == "failed" and delivery.attempts == 1 and delivery.last_status_code == 404
    assert delivery.last_error == "HTTP 404"

    gone.delete()
    down = webhooks.create_webhook(url=f"{receiver.url}/down", user=designer)
    receiver.plan = [503, 429, 502]
    inference.fail_job(str(running_inference("designer").id), {"error": "x"})
    [delivery] = delivered(down)
    assert delivery.status == "failed" and delivery.attempts == 3
    assert delivery.last_error == "HTTP 502; gave up after 3 attempts"
    assert len(receiver.at("/down")) == 3


def test_a_role_webhook_fires_for_its_members_jobs_and_not_for_others(
    designer, outsider, worker, receiver, allow_loopback, disk_store
):
    role_hook = webhooks.create_webhook(url=f"{receiver.url}/role", role=Role.objects.get(name="Designer"))
    trainings_only = webhooks.create_webhook(url=f"{receiver.url}/trainings", user=designer, events=["training.ended"])
    outsider_hook = webhooks.create_webhook(url=f"{receiver.url}/outsider", user=outsider)

    mine = running_inference("designer")
    succeed(mine)
    theirs = running_inference("outsider")
    succeed(theirs)

    [to_role] = delivered(role_hook)
    [to_outsider] = delivered(outsider_hook)
    assert to_role.job_id == str(mine.id) and to_outsider.job_id == str(theirs.id)
    time.sleep(0.3)
    assert [json.loads(r.body)["data"]["InferenceJobId"] for r in receiver.at("/role")] == [str(mine.id)]
    assert [json.loads(r.body)["data"]["InferenceJobId"] for r in receiver.at("/outsider")] == [str(theirs.id)]
    assert receiver.at("/trainings") == [] and not trainings_only.deliveries.exists()


def test_an_address_the_guard_refuses_at_delivery_time_fails_the_delivery_with_the_reason(
    designer, worker, receiver, allow_loopback, disk_store
):
    hook = webhooks.create_webhook(url=f"{receiver.url}/hook", user=designer)
    allow_loopback.ESD_WEBHOOK_ALLOWED_NETWORKS = []  # the operator closes the network (or DNS now points inside)
    succeed(running_inference("designer"))

    [delivery] = delivered(hook)
    assert delivery.status == "failed" and delivery.attempts == 1 and delivery.last_status_code is None
    assert delivery.last_error == "refused: host '127.0.0.1' resolves to an address that is not allowed"
    assert receiver.requests == []


# --- creation ----------------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://127.0.0.1:9/hook", "http://169.254.169.254/"])
def test_a_private_address_is_refused_at_creation_with_a_clear_message(designer, settings, url):
    settings.ESD_WEBHOOK_ALLOW_PRIVATE = False
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = []
    with pytest.raises(BadRequest) as refused:
        webhooks.create_webhook(url=url, user=designer)
    host = urlsplit(url).hostname
    assert refused.value.message == (
        f"webhook url {url} is not allowed: host '{host}' resolves to an address that is not allowed; private, "
        "loopback and link-local addresses are refused unless ESD_WEBHOOK_ALLOW_PRIVATE or "
        "ESD_WEBHOOK_ALLOWED_NETWORKS admit them"
    )
    assert not Webhook.objects.exists()


@pytest.mark.django_db
def test_creation_refuses_other_schemes_unknown_events_and_owner_mixups(designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    with pytest.raises(BadRequest, match="only http and https URLs are allowed"):
        webhooks.create_webhook(url="ftp://127.0.0.1/x", user=designer)
    with pytest.raises(BadRequest, match=re.escape("webhook event job.started is not supported")):
        webhooks.create_webhook(url="http://127.0.0.1/x", user=designer, events=["job.started"])
    with pytest.raises(BadRequest, match="exactly one user or one role"):
        webhooks.create_webhook(url="http://127.0.0.1/x")
    hook = webhooks.create_webhook(url=" http://127.0.0.1/x ", user=designer)
    assert hook.url == "http://127.0.0.1/x" and hook.events == ["inference.ended", "training.ended"]
    assert len(hook.secret) >= 40 and hook.secret != webhooks.create_webhook(url=hook.url, user=designer).secret


def test_signature_helper_matches_the_scheme():
    header = webhooks.signature("s3cret", 1700000000, b'{"a":1}')
    digest = hmac.new(b"s3cret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={digest}"
    assert webhooks.verify("s3cret", header, b'{"a":1}', now=1700000100)
    assert not webhooks.verify("s3cret", header, b'{"a":2}', now=1700000100)
    assert not webhooks.verify("s3cret", header, b'{"a":1}', now=1700000000 + 301)  # too old: a replay
    assert not webhooks.verify("s3cret", "garbage", b"")


# --- the command -------------------------------------------------------------------------------------------------


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("webhooks", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_the_command_adds_lists_tests_and_removes_webhooks(designer, worker, receiver, allow_loopback):
    out, err = run("add", "--user", "designer", "--url", f"{receiver.url}/cmd", "--events", "training.ended")
    hook = Webhook.objects.get()
    assert out.strip().splitlines()[-1] == hook.secret  # the secret alone on the last line, shown once
    assert f"webhook {hook.pk} for user designer" in err
    assert hook.user == designer and hook.events == ["training.ended"] and hook.created_by == "manage.py"

    out, _ = run("add", "--role", "Designer", "--url", f"{receiver.url}/role")
    role_hook = Webhook.objects.get(role__name="Designer")
    listed, _ = run("list")
    assert f"{hook.pk}\tuser designer\t{receiver.url}/cmd\ttraining.ended" in listed
    assert f"{role_hook.pk}\trole Designer\t{receiver.url}/role\tinference.ended,training.ended" in listed
    assert hook.secret not in listed and role_hook.secret not in listed

    out, _ = run("test", str(hook.pk))
    [ping] = delivered(hook)
    assert ping.event == "ping" and ping.status == "delivered"
    [got] = receiver.at("/cmd")
    assert valid_signature(hook.secret, got) and json.loads(got.body)["data"] == {
        "webhook": hook.pk,
        "subscriber": "user designer",
    }

    run("remove", str(hook.pk))
    assert not Webhook.objects.filter(pk=hook.pk).exists()


@pytest.mark.django_db
def test_the_command_refuses_what_the_service_refuses(designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = []
    with pytest.raises(CommandError, match=re.escape("webhook url http://10.0.0.1/ is not allowed")):
        run("add", "--user", "designer", "--url", "http://10.0.0.1/")
    with pytest.raises(CommandError, match="user nobody does not exist"):
        run("add", "--user", "nobody", "--url", "http://10.0.0.1/")
    with pytest.raises(CommandError, match="webhook 999 does not exist"):
        run("remove", "999")
    assert not Webhook.objects.exists()


# --- console and admin -------------------------------------------------------------------------------------------


def page(response) -> str:
    import html

    return html.unescape(response.content.decode())


@pytest.mark.django_db
def test_the_console_page_manages_own_webhooks_and_shows_the_secret_once(client, designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    client.force_login(designer)
    assert client.get("/webhooks/").status_code == 200

    answer = client.post("/webhooks/", {"url": "http://10.0.0.1/x", "events": ["inference.ended"]})
    assert answer.status_code == 400 and "webhook url http://10.0.0.1/x is not allowed" in page(answer)

    answer = client.post("/webhooks/", {"url": "http://127.0.0.1:9/x", "events": ["inference.ended"]})
    hook = Webhook.objects.get()
    assert answer.status_code == 200 and hook.user == designer and hook.events == ["inference.ended"]
    assert hook.secret in page(answer)
    again = page(client.get("/webhooks/"))
    assert "http://127.0.0.1:9/x" in again and hook.secret not in again

    # Role webhooks are role administration (role:all); the designer holds no such permission.
    answer = client.post("/webhooks/", {"url": "http://127.0.0.1:9/y", "role": "Designer"})
    assert answer.status_code == 403 and Webhook.objects.count() == 1

    assert client.post(f"/webhooks/{hook.pk}/delete/").status_code == 302
    assert not Webhook.objects.exists()


@pytest.mark.django_db
def test_operators_manage_role_webhooks_and_others_cannot_touch_them(client, admin, designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    client.force_login(admin)
    answer = client.post("/webhooks/", {"url": "http://127.0.0.1:9/role", "role": "Designer"})
    assert answer.status_code == 200
    hook = Webhook.objects.get()
    assert hook.role.name == "Designer" and hook.user is None and hook.created_by == "admin"
    assert "role Designer" in page(client.get("/webhooks/"))

    client.force_login(designer)
    assert "http://127.0.0.1:9/role" not in page(client.get("/webhooks/"))
    assert client.post(f"/webhooks/{hook.pk}/delete/").status_code == 404
    assert Webhook.objects.filter(pk=hook.pk).exists()


@pytest.mark.django_db
def test_the_admin_lists_deliveries_read_only_with_a_status_filter(client, designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    operator = make_user("root", is_staff=True, is_superuser=True)
    hook = webhooks.create_webhook(url="http://127.0.0.1:9/x", user=designer)
    delivery = WebhookDelivery.objects.create(
        webhook=hook, event="inference.ended", body="{}", status="failed", attempts=3, last_error="HTTP 500"
    )
    client.force_login(operator)
    listing = page(client.get("/admin/accounts/webhookdelivery/?status__exact=failed"))
    assert str(delivery.id) in listing and "HTTP 500" in listing
    assert str(delivery.id) not in page(client.get("/admin/accounts/webhookdelivery/?status__exact=delivered"))
    assert client.get("/admin/accounts/webhookdelivery/add/").status_code == 403
    detail = page(client.get(f"/admin/accounts/webhookdelivery/{delivery.pk}/change/"))
    assert 'name="body"' not in detail  # read-only
    assert client.get("/admin/accounts/webhook/").status_code == 200
    assert hook.secret not in page(client.get(f"/admin/accounts/webhook/{hook.pk}/change/"))

    form = {"user": designer.pk, "url": "http://10.0.0.1/x", "events": '["training.ended"]', "active": "on"}
    refused = page(client.post("/admin/accounts/webhook/add/", form))
    assert "webhook url http://10.0.0.1/x is not allowed" in refused and Webhook.objects.count() == 1
    added = client.post("/admin/accounts/webhook/add/", {**form, "url": "http://127.0.0.1:9/y"}, follow=True)
    new = Webhook.objects.exclude(pk=hook.pk).get()
    assert new.events == ["training.ended"] and new.created_by == "root" and new.secret in page(added)


def test_readme_snippet_verifies_a_real_delivery(designer, worker, receiver, allow_loopback):
    """The README's verification code, run as a receiver would run it, accepts what we send."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = readme.split("<!-- webhook-verify -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102
    hook = webhooks.create_webhook(url=f"{receiver.url}/readme", user=designer)
    webhooks.ping(hook)
    delivered(hook)
    [got] = receiver.at("/readme")
    assert namespace["verify"](hook.secret, got.headers["X-ESD-Signature"], got.body)
    assert not namespace["verify"](hook.secret, got.headers["X-ESD-Signature"], got.body + b" ")


# --- review fixes: bounded attempts, leases, queue, rate limit, no read-back ----------------------------------------


class Trickler:
    """A receiver that answers one byte per second and never finishes: the status line, then an endless header
    (``mode="headers"``), or a complete head and then an endless body (``mode="body"``). ``connections`` counts
    the requests it got, ``held`` how long each lasted until the client hung up."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.connections = 0
        self.held: list[float] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/slow"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        started = time.monotonic()
        with conn:
            _read_request(conn)
            head = b"HTTP/1.1 200 OK\r\nX-Slow: "
            if self.mode == "body":
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
            try:
                conn.sendall(head)
                for _ in range(60):
                    conn.sendall(b"x")
                    if _closed(conn, timeout=1.0):
                        break
            except OSError:
                pass
        self.held.append(time.monotonic() - started)

    def close(self) -> None:
        self.stopped.set()
        self.server.close()


def _read_request(conn: socket.socket) -> None:
    """Read the whole request (head and Content-Length body), so that what comes later is only the hang-up."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def _closed(conn: socket.socket, timeout: float) -> bool:
    """Whether the peer hung up within ``timeout`` (waiting doubles as the trickle's pause)."""
    conn.settimeout(timeout)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


@pytest.fixture
def trickler():
    made: list[Trickler] = []

    def make(mode: str = "headers") -> Trickler:
        made.append(Trickler(mode))
        return made[-1]

    yield make
    for one in made:
        one.close()


def pending(hook: Webhook, **fields) -> WebhookDelivery:
    """A delivery row as queue_delivery writes it, without sending it (the test drives ``attempt`` itself)."""
    return WebhookDelivery.objects.create(
        webhook=hook, event="ping", body=json.dumps({"event": "ping", "data": {}}), **fields
    )


@pytest.mark.django_db
def test_a_trickling_receiver_is_cut_at_the_total_deadline_and_the_attempt_counts(designer, allow_loopback, trickler):
    allow_loopback.ESD_WEBHOOK_TIMEOUT = 1.5
    allow_loopback.ESD_WEBHOOK_MAX_ATTEMPTS = 2
    slow = trickler("headers")
    hook = webhooks.create_webhook(url=slow.url, user=designer)
    delivery = pending(hook)

    started = time.monotonic()
    assert webhooks.attempt(str(delivery.id)) == webhooks.RETRY
    assert time.monotonic() - started < 1.5 + 5  # a bound (busy CI machines): a byte a second would take a minute
    delivery.refresh_from_db()
    assert delivery.status == "pending" and delivery.attempts == 1 and delivery.leased_until is None
    assert delivery.last_error == f"no complete answer from {slow.url} within 1.5 s"
    assert delivery.last_status_code is None

    started = time.monotonic()
    assert webhooks.attempt(str(delivery.id)) == webhooks.FAILED
    assert time.monotonic() - started < 1.5 + 5
    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 2
    assert delivery.last_error == f"no complete answer from {slow.url} within 1.5 s; gave up after 2 attempts"
    assert slow.connections == 2
    wait_until(lambda: len(slow.held) == 2)
    # we hung up at the deadline (the server notices within its 1 s pause); a bound a busy machine keeps, where a
    # trickle never cut would last a minute
    assert max(slow.held) < 1.5 + 1.0 + 5


def test_the_worker_retries_a_trickled_delivery_and_gives_up_at_the_attempts(
    designer, worker, allow_loopback, trickler
):
    allow_loopback.ESD_WEBHOOK_TIMEOUT = 1
    allow_loopback.ESD_WEBHOOK_MAX_ATTEMPTS = 2
    slow = trickler("headers")
    hook = webhooks.create_webhook(url=slow.url, user=designer)
    webhooks.ping(hook)

    [delivery] = delivered(hook)
    assert delivery.status == "failed" and delivery.attempts == 2 and delivery.leased_until is None
    assert delivery.last_error.endswith("within 1 s; gave up after 2 attempts")
    assert slow.connections == 2
    assert webhooks.pending_ids() == []  # nothing left for the recoverer to re-send on the next start


def test_post_reads_a_bounded_reply_and_stops_a_trickled_body_at_the_deadline(trickler):
    """``esd.fetch.post`` itself: the deadline covers reading the body too, and the body read is capped."""
    guard = Guard(allowed_networks=("127.0.0.0/8",), timeout=1.5)
    slow = trickler("body")
    started = time.monotonic()
    with pytest.raises(UrlNotReachable) as cut:
        post(slow.url, b"{}", guard, max_reply_bytes=50)
    assert cut.value.reason == f"no complete answer from {slow.url} within 1.5 s"
    assert time.monotonic() - started < 1.5 + 5
    # Not reading the body at all, the status alone is the answer at once.
    started = time.monotonic()
    assert post(trickler("body").url, b"{}", guard, max_reply_bytes=0).status == 200
    assert time.monotonic() - started < 10  # the trickled body alone takes 100 s


def test_a_duplicate_message_while_an_attempt_is_out_sends_nothing(designer, worker, receiver, allow_loopback):
    from apps.accounts.tasks import deliver_webhook

    receiver.hold = threading.Event()
    hook = webhooks.create_webhook(url=f"{receiver.url}/held", user=designer)
    ping = webhooks.ping(hook)
    wait_until(lambda: receiver.at("/held"))  # the first attempt is out, its answer held back

    row = WebhookDelivery.objects.get(pk=ping.pk)
    assert row.status == "pending" and row.attempts == 1 and row.leased_until > timezone.now()
    assert webhooks.attempt(str(ping.pk)) == webhooks.BUSY  # a copy of the message, in this thread
    deliver_webhook.send(str(ping.pk))  # and one through the worker's second thread
    time.sleep(0.5)
    assert len(receiver.at("/held")) == 1
    # The row is not locked meanwhile: the console, the admin and other workers read and write it freely.
    assert WebhookDelivery.objects.filter(pk=ping.pk).update(job_id="") == 1

    receiver.hold.set()
    [done] = delivered(hook)
    assert done.status == "delivered" and done.attempts == 1 and done.leased_until is None
    time.sleep(0.3)
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_a_lease_left_by_a_dead_worker_is_taken_over_once_it_runs_out(designer, receiver, allow_loopback):
    allow_loopback.ESD_WEBHOOK_MAX_ATTEMPTS = 3
    hook = webhooks.create_webhook(url=f"{receiver.url}/late", user=designer)
    now = timezone.now()
    fresh = pending(hook, attempts=1, leased_until=now + timedelta(seconds=30))
    assert webhooks.attempt(str(fresh.id)) == webhooks.BUSY and receiver.requests == []

    stale = pending(hook, attempts=1, leased_until=now - timedelta(seconds=1))
    lease = WebhookDelivery.objects.get(pk=stale.pk).leased_until.isoformat()
    # The follow-up of a copy that found the row busy: it takes over only the very lease it saw.
    assert webhooks.attempt(str(stale.id), stale_lease="2000-01-01T00:00:00+00:00") == webhooks.SKIPPED
    assert receiver.requests == []
    assert webhooks.attempt(str(stale.id), stale_lease=lease) == webhooks.DELIVERED
    stale.refresh_from_db()
    assert stale.status == "delivered" and stale.attempts == 2 and len(receiver.at("/late")) == 1

    # A dead worker's last allowed attempt: the row fails instead of being sent once more.
    spent = pending(hook, attempts=3, leased_until=now - timedelta(seconds=1))
    assert webhooks.attempt(str(spent.id)) == webhooks.FAILED
    spent.refresh_from_db()
    assert spent.status == "failed" and spent.last_error == "the last attempt did not finish; gave up after 3 attempts"
    assert len(receiver.requests) == 1


@pytest.mark.django_db
def test_a_pending_delivery_of_a_deactivated_webhook_is_not_sent(designer, receiver, allow_loopback):
    hook = webhooks.create_webhook(url=f"{receiver.url}/off", user=designer)
    delivery = pending(hook, attempts=1, last_error="HTTP 503")  # waiting for its retry
    Webhook.objects.filter(pk=hook.pk).update(active=False)

    assert webhooks.attempt(str(delivery.id)) == webhooks.FAILED
    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 1
    assert delivery.last_error == f"not sent: webhook {hook.pk} is inactive"
    assert receiver.requests == []
    hook.refresh_from_db()
    with pytest.raises(BadRequest, match=f"webhook {hook.pk} is inactive"):
        webhooks.ping(hook)
    assert hook.deliveries.count() == 1


@pytest.mark.django_db
def test_test_pings_are_rate_limited_per_webhook(client, designer, settings):
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    settings.ESD_WEBHOOK_PING_INTERVAL = 3  # the checks below fit in it on a busy machine
    hook = webhooks.create_webhook(url="http://127.0.0.1:9/a", user=designer)
    other = webhooks.create_webhook(url="http://127.0.0.1:9/b", user=designer)
    client.force_login(designer)

    first = client.post(f"/webhooks/{hook.pk}/test/", follow=True)
    assert "Ping queued for http://127.0.0.1:9/a." in page(first)
    again = client.post(f"/webhooks/{hook.pk}/test/", follow=True)
    assert again.status_code == 200
    assert f"webhook {hook.pk} was tested less than 3 s ago; wait a few seconds before testing it again" in page(again)
    with pytest.raises(CommandError, match=f"webhook {hook.pk} was tested less than 3 s ago"):
        run("test", str(hook.pk))
    assert hook.deliveries.count() == 1
    run("test", str(other.pk))  # another webhook has its own allowance
    assert other.deliveries.count() == 1

    time.sleep(3.1)
    run("test", str(hook.pk))
    assert hook.deliveries.count() == 2


def test_the_body_of_an_error_reply_is_never_recorded_nor_shown(client, designer, worker, receiver, allow_loopback):
    allow_loopback.ESD_WEBHOOK_MAX_ATTEMPTS = 1
    receiver.error_body = b"internal-page: db_password=hunter2"
    receiver.plan = [500]
    hook = webhooks.create_webhook(url=f"{receiver.url}/inside", user=designer)
    webhooks.ping(hook)

    [delivery] = delivered(hook)
    assert delivery.status == "failed" and delivery.last_status_code == 500
    assert delivery.last_error == "HTTP 500; gave up after 1 attempts"
    client.force_login(designer)
    shown = page(client.get("/webhooks/"))
    assert "HTTP 500" in shown and "hunter2" not in shown and "internal-page" not in shown
    operator = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(operator)
    assert "hunter2" not in page(client.get(f"/admin/accounts/webhookdelivery/{delivery.pk}/change/"))


def test_deliveries_have_their_own_queue_which_the_control_plane_consumes(transactional_db, settings, designer):
    import dramatiq

    from apps.accounts.tasks import deliver_webhook
    from esd.tasks import load_actor_modules

    load_actor_modules()
    assert settings.ESD_WEBHOOK_QUEUE == "esd-webhooks"
    assert deliver_webhook.queue_name == settings.ESD_WEBHOOK_QUEUE
    assert settings.ESD_WEBHOOK_QUEUE in control_queues() and "default" in control_queues()
    broker = dramatiq.get_broker()
    broker.flush_all()
    settings.ESD_WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    hook = webhooks.create_webhook(url="http://127.0.0.1:9/q", user=designer)
    webhooks.ping(hook)  # no worker runs: the message waits where workers of that queue will find it
    assert queue_backlog(settings.ESD_WEBHOOK_QUEUE) == 1 and queue_backlog("default") == 0
    broker.flush_all()


def test_webhook_allowances_do_not_inherit_the_checkpoint_ones():
    """Opening a model mirror's network to downloads leaves webhooks' guard as it was."""
    root = Path(__file__).resolve().parents[2]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ESD_WEBHOOK_")}
    environment |= {
        "ESD_CHECKPOINT_URL_ALLOW_PRIVATE": "true",
        "ESD_CHECKPOINT_URL_ALLOWED_NETWORKS": "10.2.0.0/16",
        "DJANGO_SETTINGS_MODULE": "esd.settings",
        "PYTHONPATH": str(root),
    }
    code = (
        "from django.conf import settings as s; "
        "print(s.ESD_CHECKPOINT_URL_ALLOW_PRIVATE, s.ESD_CHECKPOINT_URL_ALLOWED_NETWORKS, "
        "s.ESD_WEBHOOK_ALLOW_PRIVATE, s.ESD_WEBHOOK_ALLOWED_NETWORKS)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=environment, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "['10.2.0.0/16']", "False", "[]"]


def test_a_delivery_a_dead_worker_left_in_flight_is_sent_once_its_lease_runs_out(
    designer, worker, receiver, allow_loopback, monkeypatch
):
    """The embedded server restarts while an attempt is out: the recoverer's message finds the lease fresh, sends
    nothing, and looks again when the lease has run out; then the delivery goes out, once."""
    from apps.accounts.tasks import recover_deliveries

    monkeypatch.setattr(webhooks, "LEASE_MARGIN_S", 0.5)  # leases of a second instead of 40 s
    allow_loopback.ESD_WEBHOOK_TIMEOUT = 0.5
    hook = webhooks.create_webhook(url=f"{receiver.url}/orphan", user=designer)
    orphan = pending(hook, attempts=1, leased_until=timezone.now() + timedelta(seconds=1))

    assert recover_deliveries() == 1
    time.sleep(0.5)
    assert receiver.requests == [] and WebhookDelivery.objects.get(pk=orphan.pk).status == "pending"
    [done] = delivered(hook)
    assert done.status == "delivered" and done.attempts == 2 and done.leased_until is None
    time.sleep(0.3)
    assert len(receiver.at("/orphan")) == 1
