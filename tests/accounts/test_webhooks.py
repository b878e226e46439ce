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
import re
import threading
import time
import uuid
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from django.core.management import CommandError, call_command

from apps.accounts import webhooks
from apps.accounts.models import Role, Webhook, WebhookDelivery
from apps.inference import services as inference
from apps.inference.models import InferenceJob
from apps.training import training
from apps.training.models import TrainingJob
from esd import keys
from esd.api.errors import BadRequest
from esd.storage import blob_store
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
            self.send_response(status)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"nope" if status >= 300 else b"fine")

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
    assert delivery.last_error == "HTTP 404: nope"

    gone.delete()
    down = webhooks.create_webhook(url=f"{receiver.url}/down", user=designer)
    receiver.plan = [503, 429, 502]
    inference.fail_job(str(running_inference("designer").id), {"error": "x"})
    [delivery] = delivered(down)
    assert delivery.status == "failed" and delivery.attempts == 3
    assert delivery.last_error == "HTTP 502: nope; gave up after 3 attempts"
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
