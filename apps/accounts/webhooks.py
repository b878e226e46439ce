"""Webhooks: call a user's (or a role's) URL when one of their jobs ends.

A webhook belongs to a user (their own jobs) or to a role (the jobs of everyone who holds it). When a job reaches
a final status, its app calls :func:`job_ended`; after the commit, one :class:`WebhookDelivery` row per matching
webhook is written with the body to send, and the ``deliver_webhook`` actor (``apps.accounts.tasks``) sends it.

The body is ``{"event", "id" (the delivery id), "created", "data"}`` where ``data`` is the job exactly as
``GET /inferences/{id}`` or ``GET /trainings/{id}`` returns it at the moment it ended. This app knows nothing about
jobs (DESIGN.md §2), so each job app registers its renderer by dotted path (:func:`register_renderer`).

Signing follows Stripe's scheme: ``X-ESD-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``.
The timestamp is part of what is signed, so a receiver that rejects old timestamps is safe from replays; each
attempt signs anew with its own time. ``X-ESD-Event`` and ``X-ESD-Delivery`` name the event and the delivery (a
receiver can drop a delivery id it has seen: delivery is at least once).

Every URL passes the SSRF guard of checkpoint downloads (``esd.fetch``): at creation, so a user
learns at once, and again at each attempt, because what a name resolves to can change. Private, loopback and
link-local addresses are refused unless ``ESD_WEBHOOK_ALLOW_PRIVATE`` or ``ESD_WEBHOOK_ALLOWED_NETWORKS`` admit them
(webhooks' own settings, off by default: the checkpoint allowances do not carry over, since anyone may add a
webhook). What a receiver answers is never stored or shown beyond its status code: a URL pointing inside must not
become a way to read internal pages back.

Outcomes of one attempt: 2xx delivered; 408, 429, 5xx, timeouts and connection errors are retried with exponential
backoff (``ESD_WEBHOOK_MIN_BACKOFF_MS`` .. ``ESD_WEBHOOK_MAX_BACKOFF_MS``, dramatiq's Retries) up to
``ESD_WEBHOOK_MAX_ATTEMPTS`` attempts; other answers (3xx, 4xx) and refused addresses fail at once. One attempt
takes at most ``ESD_WEBHOOK_TIMEOUT`` seconds in all, and holds no transaction while the request is out (see
:func:`attempt`); deliveries wait in their own queue (``ESD_WEBHOOK_QUEUE``), so slow receivers never delay the
control plane's other work.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.module_loading import import_string

from apps.accounts.choices import PING_EVENT, WebhookDeliveryStatus, WebhookEvent
from apps.accounts.models import Role, User, Webhook, WebhookDelivery
from esd.api.errors import BadRequest, EsdError
from esd.fetch import Guard, UrlNotAllowed, UrlNotReachable, check_url, post

log = logging.getLogger("esd.webhooks")

DELIVER_ACTOR = "apps.accounts.tasks.deliver_webhook"
SIGNATURE_HEADER = "X-ESD-Signature"
EVENT_HEADER = "X-ESD-Event"
DELIVERY_HEADER = "X-ESD-Delivery"
USER_AGENT = "esd-server webhooks"
# Answers that say "try again later" although they are not 5xx.
RETRY_STATUSES = frozenset({408, 429})
# Kinds of job and the event each one's end sends.
KIND_EVENTS = {"inference": WebhookEvent.INFERENCE_ENDED.value, "training": WebhookEvent.TRAINING_ENDED.value}

DELIVERED, FAILED, RETRY = "delivered", "failed", "retry"
# Another attempt at the delivery is out (its lease is fresh): this copy of the message sends nothing, and the actor
# looks again when the lease runs out (:func:`watch_lease`), in case that attempt's worker died.
BUSY = "busy"
# Nothing for this copy to do: the row moved on since it was sent (another attempt took it, or recorded its outcome).
SKIPPED = "skipped"
# A claimed row stays leased this much longer than an attempt may take, so a resolver that is slow (name
# resolution comes before the request's own deadline) or a slow commit never lets a second copy in while the
# first is still out. A worker that dies mid-attempt leaves the lease to run out; the row is then claimable again.
LEASE_MARGIN_S = 30

# kind -> dotted path of ``render(job_id) -> dict | None`` (None: the job is gone).
_RENDERERS: dict[str, str] = {}


def register_renderer(kind: str, path: str) -> None:
    """A job app says how its jobs look in ``GET`` (called from its AppConfig.ready, so every process has it)."""
    _RENDERERS[kind] = path


def _renderer(kind: str) -> Callable[[str], dict[str, Any] | None]:
    if kind not in _RENDERERS:
        raise LookupError(f"no webhook renderer for {kind!r} jobs")
    return import_string(_RENDERERS[kind])


# --- managing webhooks -----------------------------------------------------------------------------------------


def guard() -> Guard:
    """What webhook URLs may reach (the same guard as checkpoint downloads, with its own settings)."""
    return Guard(
        allow_private=settings.ESD_WEBHOOK_ALLOW_PRIVATE,
        allowed_networks=tuple(settings.ESD_WEBHOOK_ALLOWED_NETWORKS),
        timeout=settings.ESD_WEBHOOK_TIMEOUT,
    )


def check_webhook_url(url: str) -> str:
    """The URL, stripped, when the guard allows it; else a 400 naming why (no address: it may be internal)."""
    url = (url or "").strip()
    if not url:
        raise BadRequest("webhook url is required")
    if len(url) > 2000:
        raise BadRequest("webhook url is longer than 2000 characters")
    try:
        check_url(url, guard())
    except UrlNotAllowed as exc:
        raise BadRequest(
            f"webhook url {url} is not allowed: {exc.reason}; private, loopback and link-local addresses are "
            "refused unless ESD_WEBHOOK_ALLOW_PRIVATE or ESD_WEBHOOK_ALLOWED_NETWORKS admit them"
        ) from None
    except UrlNotReachable as exc:
        raise BadRequest(f"webhook url {url} is not reachable: {exc.reason}") from None
    return url


def check_events(events: Iterable[str] | None) -> list[str]:
    """The events asked for, in a stable order; none named means all of them; an unknown one is refused."""
    wanted = list(dict.fromkeys(events or []))
    if not wanted:
        return list(WebhookEvent.values)
    unknown = [event for event in wanted if event not in WebhookEvent.values]
    if unknown:
        raise BadRequest(f"webhook event {unknown[0]} is not supported; choose from {', '.join(WebhookEvent.values)}")
    return [event for event in WebhookEvent.values if event in wanted]


def create_webhook(
    *, url: str, user: User | None = None, role: Role | None = None, events: Iterable[str] | None = None, by: str = ""
) -> Webhook:
    """A new webhook for a user or a role, with a fresh secret (returned on the row: show it once)."""
    if (user is None) == (role is None):
        raise BadRequest("a webhook belongs to exactly one user or one role")
    return Webhook.objects.create(
        user=user,
        role=role,
        url=check_webhook_url(url),
        events=check_events(events),
        secret=secrets.token_urlsafe(32),
        created_by=by,
    )


def manageable_by(user: User, permissions: frozenset[str]) -> QuerySet[Webhook]:
    """The webhooks a console user may see and change: their own, and with ``role:all`` every role's."""
    found = Q(user=user)
    if "role:all" in permissions:
        found |= Q(role__isnull=False)
    return Webhook.objects.filter(found).select_related("user", "role")


def subscribed(owner: str, event: str) -> list[Webhook]:
    """Active webhooks that want ``event`` for a job of user ``owner``: theirs and those of the roles they hold."""
    user = User.objects.filter(username=owner).first()
    if user is None:
        return []
    rows = Webhook.objects.filter(Q(user=user) | Q(role__in=Role.objects.held_by(user)), active=True)
    # Filtered here, not with ``events__contains``: SQLite has no JSON containment, and a user has few webhooks.
    return [hook for hook in rows.select_related("user", "role") if event in hook.events]


# --- events ----------------------------------------------------------------------------------------------------


def job_ended(kind: str, job_id: str, owner: str) -> None:
    """A job of ``kind`` (``inference`` | ``training``) reached a final status: notify its owner's webhooks.

    Called where the job app makes the status final; the work runs after the commit, so it sees the final row and
    never happens for a change that was rolled back. A failure here is logged and never breaks the job's ending.
    """

    def notify() -> None:
        try:
            _notify(kind, str(job_id), owner)
        except Exception:
            log.exception("webhooks for %s job %s could not be queued", kind, job_id)

    transaction.on_commit(notify)


def _notify(kind: str, job_id: str, owner: str) -> list[WebhookDelivery]:
    hooks = subscribed(owner, KIND_EVENTS[kind])
    if not hooks:
        return []
    data = _renderer(kind)(job_id)
    if data is None:
        return []
    return [queue_delivery(hook, KIND_EVENTS[kind], data, job_id=job_id) for hook in hooks]


def queue_delivery(hook: Webhook, event: str, data: Any, *, job_id: str = "") -> WebhookDelivery:
    """Write a delivery of ``event`` with ``data`` and send it (after the surrounding commit)."""
    delivery_id = uuid.uuid4()
    created = timezone.now()
    envelope = {"event": event, "id": str(delivery_id), "created": created.isoformat(), "data": data}
    delivery = WebhookDelivery.objects.create(
        id=delivery_id,
        webhook=hook,
        event=event,
        job_id=job_id,
        body=json.dumps(envelope, separators=(",", ":"), default=str),
        created_at=created,
    )
    send_delivery(str(delivery.id))
    return delivery


def ping(hook: Webhook) -> WebhookDelivery:
    """A test event (``manage.py webhooks test``, the console's Test button, the admin action): proves URL, secret
    and receiver.

    At most one per webhook every ``ESD_WEBHOOK_PING_INTERVAL`` seconds (the cache holds the mark, shared by all
    processes when ``CACHE_URL`` is Redis): the button is an easy way to make this server POST to a URL again and
    again. A ping too soon is refused with 429 and how long to wait; an inactive webhook is not pinged at all.
    """
    if not hook.active:
        raise BadRequest(f"webhook {hook.pk} is inactive; activate it before testing it")
    interval = settings.ESD_WEBHOOK_PING_INTERVAL
    if interval > 0 and not cache.add(f"esd:webhook-ping:{hook.pk}", time.time(), timeout=interval):
        raise EsdError(
            f"webhook {hook.pk} was tested less than {interval} s ago; wait a few seconds before testing it again",
            status=429,
        )
    return queue_delivery(hook, PING_EVENT, {"webhook": hook.pk, "subscriber": hook.subscriber})


def lease_seconds() -> float:
    """How long a claimed delivery is held: the attempt's own limit plus a margin."""
    return settings.ESD_WEBHOOK_TIMEOUT + LEASE_MARGIN_S


def send_delivery(delivery_id: str, *, delay_ms: int | None = None, lease: str | None = None) -> None:
    """Enqueue an attempt after the commit, with the backoff the settings say *now* (per-message options win over
    the actor's, so operators and tests can change them without re-importing the actor).

    The actor's time limit is set above the lease: an attempt ends by its own deadline long before, so the limit
    only ever stops something unforeseen, and then the attempt is already counted (see :func:`attempt`).
    """
    options: dict[str, Any] = {
        "min_backoff": settings.ESD_WEBHOOK_MIN_BACKOFF_MS,
        "max_backoff": settings.ESD_WEBHOOK_MAX_BACKOFF_MS,
        # The row counts attempts and gives up; dramatiq's own limit is only a safety net above it.
        "max_retries": settings.ESD_WEBHOOK_MAX_ATTEMPTS + 2,
        "time_limit": int((lease_seconds() + LEASE_MARGIN_S) * 1000),
    }
    if delay_ms is not None:
        options["delay"] = delay_ms

    def send() -> None:
        args = (delivery_id,) if lease is None else (delivery_id, lease)
        import_string(DELIVER_ACTOR).send_with_options(args=args, **options)

    transaction.on_commit(send)


# --- delivering ------------------------------------------------------------------------------------------------


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-ESD-Signature`` value: ``t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: int = 300, now: float | None = None) -> bool:
    """What a receiver does (README shows the same in a few lines): the signature matches and is recent."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    expected = signature(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def attempt(delivery_id: str, *, stale_lease: str | None = None) -> str:
    """Send a pending delivery once and record how it went: ``delivered``, ``failed``, ``retry``, or ``busy`` /
    ``skipped`` when this copy of the message has nothing to send.

    Three steps, and no transaction or row lock is held while the request is out (a receiver may take up to
    ``ESD_WEBHOOK_TIMEOUT``; a lock held that long would stall whatever else touches the row):

    1. :func:`_claim`, one short transaction: the attempt is counted and the row leased (``leased_until``) before
       anything is sent, so an attempt that never comes back (worker killed, time limit) still counts, and
       ``ESD_WEBHOOK_MAX_ATTEMPTS`` ends every delivery. A copy of the message (delivery is at least once) that
       finds a fresh lease sends nothing (``busy``); a lease that ran out is a dead worker's and is taken over.
    2. The POST, bounded in all by ``ESD_WEBHOOK_TIMEOUT`` (``esd.fetch.post``).
    3. :func:`_record`, another short transaction: the outcome, written only while the lease is still ours.

    ``stale_lease`` (the follow-up :func:`watch_lease` sends) takes the row over only if that very lease is still on
    it, i.e. the attempt that took it never recorded an outcome; if the row moved on there is nothing to do.
    """
    claimed = _claim(delivery_id, stale_lease)
    if isinstance(claimed, str):
        return claimed
    delivery, lease = claimed
    hook = delivery.webhook
    body = delivery.body.encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        SIGNATURE_HEADER: signature(hook.secret, timestamp, body),
        EVENT_HEADER: delivery.event,
        DELIVERY_HEADER: str(delivery.id),
    }
    status_code: int | None = None
    try:
        # The status says it all: the body is not read (a 200 whose body trickles is still a 200).
        reply = post(hook.url, body, guard(), headers, max_reply_bytes=0)
    except UrlNotAllowed as exc:
        outcome, error = FAILED, f"refused: {exc.reason}"
    except UrlNotReachable as exc:
        outcome, error = RETRY, exc.reason or "not reachable"
    except BaseException as exc:
        # Something unforeseen (the actor's time limit, a bug): give the row back at once, counted, and let
        # dramatiq's retry (or the recoverer) try again rather than wait for the lease to run out.
        _record(delivery, lease, RETRY, None, f"the attempt was interrupted ({type(exc).__name__})")
        raise
    else:
        status_code = reply.status
        outcome, error = _judge(reply.status)
    return _record(delivery, lease, outcome, status_code, error)


def _claim(delivery_id: str, stale_lease: str | None = None) -> str | tuple[WebhookDelivery, Any]:
    """Step 1 of :func:`attempt`: the row, counted and leased; or the outcome when there is nothing to send."""
    with transaction.atomic():
        delivery = (
            WebhookDelivery.objects.select_for_update(of=("self",))
            .select_related("webhook")
            .filter(pk=delivery_id)
            .first()
        )
        if delivery is None or delivery.status != WebhookDeliveryStatus.PENDING:
            return DELIVERED if delivery is not None and delivery.status == WebhookDeliveryStatus.DELIVERED else FAILED
        if stale_lease is not None and (
            delivery.leased_until is None or delivery.leased_until.isoformat() != stale_lease
        ):
            return SKIPPED
        now = timezone.now()
        if delivery.leased_until is not None and delivery.leased_until > now:
            log.info("webhook delivery %s is being sent by another worker until %s", delivery_id, delivery.leased_until)
            return BUSY
        stale = delivery.leased_until is not None
        if not delivery.webhook.active:
            # Deactivating a webhook stops what it still had queued; the admin's "send again" resumes a delivery.
            delivery.status = WebhookDeliveryStatus.FAILED
            delivery.leased_until = None
            delivery.last_error = f"not sent: webhook {delivery.webhook_id} is inactive"
            delivery.save(update_fields=["status", "leased_until", "last_error"])
            log.info("webhook delivery %s not sent: webhook %s is inactive", delivery_id, delivery.webhook_id)
            return FAILED
        if delivery.attempts >= settings.ESD_WEBHOOK_MAX_ATTEMPTS:
            # Only an attempt that never recorded its outcome (its worker died) leaves a pending row here.
            delivery.status = WebhookDeliveryStatus.FAILED
            delivery.leased_until = None
            last = delivery.last_error or "the last attempt did not finish"
            delivery.last_error = f"{last}; gave up after {delivery.attempts} attempts"
            delivery.save(update_fields=["status", "leased_until", "last_error"])
            return FAILED
        if stale:
            log.warning("webhook delivery %s: attempt %d never finished; trying again", delivery_id, delivery.attempts)
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.leased_until = now + timedelta(seconds=lease_seconds())
        # Cleared while the attempt is out: a worker that dies leaves it empty, which reads "did not finish".
        delivery.last_error = ""
        delivery.last_status_code = None
        delivery.save(update_fields=["attempts", "last_attempt_at", "leased_until", "last_error", "last_status_code"])
    return delivery, delivery.leased_until


def _record(delivery: WebhookDelivery, lease: Any, outcome: str, status_code: int | None, error: str) -> str:
    """Step 3 of :func:`attempt`: write the outcome, unless the lease ran out and another attempt took the row
    (then that attempt records its own outcome, and this one reports ``skipped`` so nothing retries twice)."""
    if outcome == RETRY and delivery.attempts >= settings.ESD_WEBHOOK_MAX_ATTEMPTS:
        outcome = FAILED
        error = f"{error}; gave up after {delivery.attempts} attempts"
    changes: dict[str, Any] = {"leased_until": None, "last_status_code": status_code, "last_error": error}
    if outcome == DELIVERED:
        changes.update(status=WebhookDeliveryStatus.DELIVERED, delivered_at=timezone.now())
    elif outcome == FAILED:
        changes["status"] = WebhookDeliveryStatus.FAILED
    with transaction.atomic():
        written = WebhookDelivery.objects.filter(
            pk=delivery.pk, status=WebhookDeliveryStatus.PENDING, leased_until=lease
        ).update(**changes)
    if not written:
        log.warning(
            "webhook delivery %s attempt %d: %s, but another attempt holds the row now",
            delivery.pk,
            delivery.attempts,
            outcome,
        )
        return SKIPPED
    log.info("webhook delivery %s attempt %d: %s %s", delivery.pk, delivery.attempts, outcome, error)
    return outcome


def _judge(status: int) -> tuple[str, str]:
    """One answer's verdict and the error to record (empty for success).

    Only the status code is recorded, never the reply's body: the console and the admin show ``last_error``, and a
    webhook pointed at an internal page must not read that page back to whoever added it.
    """
    if 200 <= status < 300:
        return DELIVERED, ""
    error = f"HTTP {status}"
    if status >= 500 or status in RETRY_STATUSES:
        return RETRY, error
    if 300 <= status < 400:
        return FAILED, f"HTTP {status}: redirects are not followed"
    return FAILED, error


def watch_lease(delivery_id: str) -> None:
    """A copy of the message found the delivery in flight: look again just after that lease runs out.

    Usually the attempt has recorded its outcome by then and the look finds nothing to do; but if its worker died
    (killed, or a restart of the embedded server, whose recoverer re-sends every pending delivery), nothing else
    would ever try the row again.
    """
    lease = (
        WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookDeliveryStatus.PENDING)
        .values_list("leased_until", flat=True)
        .first()
    )
    if lease is None:
        return
    delay_ms = max(0, int((lease - timezone.now()).total_seconds() * 1000)) + 1000
    send_delivery(delivery_id, delay_ms=delay_ms, lease=lease.isoformat())


def redeliver(delivery: WebhookDelivery) -> None:
    """Try a failed delivery again from scratch (admin action): same body, attempts counted anew."""
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        status=WebhookDeliveryStatus.PENDING, attempts=0, last_error="", last_status_code=None, leased_until=None
    )
    send_delivery(str(delivery.pk))


def pending_ids() -> list[str]:
    """Deliveries still to be tried (the recoverer re-sends them after a restart of the in-process broker)."""
    return [
        str(pk)
        for pk in WebhookDelivery.objects.filter(status=WebhookDeliveryStatus.PENDING).values_list("pk", flat=True)
    ]
