"""Accounts actors: webhook deliveries. They take a delivery id and are safe to run twice."""

from __future__ import annotations

import dramatiq
from django.conf import settings

from apps.accounts import webhooks
from esd.tasks import recoverer

# Per-message options set by ``webhooks.send_delivery`` (backoff, max_retries from the settings) override these.
WEBHOOK_TIME_LIMIT_MS = 2 * 60 * 1000


@dramatiq.actor(
    queue_name=settings.ESD_WEBHOOK_QUEUE,
    max_retries=11,
    min_backoff=10_000,
    max_backoff=3_600_000,
    time_limit=WEBHOOK_TIME_LIMIT_MS,
)
def deliver_webhook(delivery_id: str, lease: str | None = None) -> None:
    """One attempt at a delivery; a retriable failure (5xx, 408/429, timeout, connection error) raises
    ``dramatiq.Retry`` so the Retries middleware sends it again after an exponential backoff.

    Its own queue (``ESD_WEBHOOK_QUEUE``): receivers are other people's servers, and however slow they are, the
    runtime events and the other control-plane work never wait behind them. ``lease`` is set on the follow-up a
    copy sends when it finds the delivery in flight (``webhooks.watch_lease``).
    """
    outcome = webhooks.attempt(delivery_id, stale_lease=lease)
    if outcome == webhooks.RETRY:
        raise dramatiq.Retry(f"webhook delivery {delivery_id} will be retried")
    if outcome == webhooks.BUSY:
        webhooks.watch_lease(delivery_id)


@recoverer("webhook deliveries")
def recover_deliveries() -> int:
    """Pending deliveries lost with the in-process broker are sent again (a sent one is never re-sent)."""
    pending = webhooks.pending_ids()
    for delivery_id in pending:
        webhooks.send_delivery(delivery_id)
    return len(pending)
