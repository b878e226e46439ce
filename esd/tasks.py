"""Shared plumbing for background work: enqueue after commit, and re-enqueue what a restart left unfinished.

Rules for every actor (DESIGN.md §4.2): it takes primary keys, exits early when its row is already terminal
(delivery is at least once), and sets ``time_limit`` and ``max_retries`` on purpose.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import dramatiq
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.utils.module_loading import import_string

from esd.discovery import import_app_modules

log = logging.getLogger("esd.tasks")

_RECOVERERS: dict[str, Callable[[], int]] = {}


def enqueue(actor: dramatiq.Actor | str, *args: Any, **kwargs: Any) -> None:
    """Send after the surrounding transaction commits, so a worker never reads a row that does not exist yet.

    Services name their actors by dotted path (``"apps.inference.tasks.invoke_realtime"``): a service never
    imports its app's ``tasks`` module, which imports the service (the layering contracts in pyproject.toml)."""

    def send() -> None:
        found = import_string(actor) if isinstance(actor, str) else actor
        found.send(*args, **kwargs)

    transaction.on_commit(send)


def recoverer(name: str) -> Callable[[Callable[[], int]], Callable[[], int]]:
    """Register a function that re-enqueues an app's unfinished work (the database says what) and counts it.

    Called when the embedded server starts (its in-process broker lost everything queued before) and by
    ``manage.py recover_work`` after a broker outage in scaled-out mode. Actors are idempotent, so sending a
    message twice is safe.
    """

    def register(func: Callable[[], int]) -> Callable[[], int]:
        _RECOVERERS[name] = func
        return func

    return register


def load_actor_modules() -> list[str]:
    """Import every app's ``tasks`` module so its actors (and recoverers) exist before a worker starts."""
    return import_app_modules("tasks")


def recover_unfinished_work() -> dict[str, int]:
    """Run every registered recoverer; one failing app does not stop the others."""
    load_actor_modules()
    counts: dict[str, int] = {}
    for name, func in sorted(_RECOVERERS.items()):
        try:
            counts[name] = func()
        except Exception:
            log.exception("recovering unfinished %s failed", name)
            counts[name] = -1
    return counts


# --- queues ------------------------------------------------------------------------------------------------------


def control_queues() -> set[str]:
    """Queues the control plane's own workers consume (``runesd``; ``rundramatiq --queues ...``).

    Endpoint queues and the training queue belong to GPU workers: a Django worker must never take their messages.
    Webhook deliveries have a queue of their own, so slow receivers never hold up runtime events or other work.
    """
    return {"default", settings.ESD_EVENTS_QUEUE, settings.ESD_WEBHOOK_QUEUE}


def queue_backlog(queue_name: str) -> int | None:
    """Messages waiting in a queue (not counting ones a worker holds), or None when the broker cannot say."""
    from dramatiq.brokers.rabbitmq import RabbitmqBroker
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.brokers.stub import StubBroker

    broker = dramatiq.get_broker()
    try:
        if isinstance(broker, StubBroker):
            queue = broker.queues.get(queue_name)
            return queue.qsize() if queue is not None else 0
        if isinstance(broker, RedisBroker):  # message ids wait in the list "{namespace}:{queue}"
            return int(broker.client.llen(f"{broker.namespace}:{queue_name}"))
        if isinstance(broker, RabbitmqBroker):
            ready, _delayed, _dead = broker.get_queue_message_counts(queue_name)
            return int(ready)
    except Exception:
        log.exception("could not read the backlog of queue %s", queue_name)
    return None


# --- events from GPU workers -------------------------------------------------------------------------------------

_EVENT_HANDLERS: dict[str, Callable[[dict], None]] = {}


def handles(kind: str) -> Callable[[Callable[[dict], None]], Callable[[dict], None]]:
    """Register the handler of one kind of runtime event (``heartbeat``, ``inference``, ``training``)."""

    def register(func: Callable[[dict], None]) -> Callable[[dict], None]:
        _EVENT_HANDLERS[kind] = func
        return func

    return register


@dramatiq.actor(actor_name="runtime_event", queue_name=settings.ESD_EVENTS_QUEUE, max_retries=3, time_limit=60_000)
def runtime_event(event: dict) -> None:
    """Everything GPU workers report arrives here (contract §12.2) and is routed by ``kind``."""
    kind = event.get("kind") if isinstance(event, dict) else None
    handler = _EVENT_HANDLERS.get(kind) if isinstance(kind, str) else None
    if handler is None:
        log.warning("ignoring runtime event of unknown kind: %r", event)
        return
    handler(event)


# --- periodic work -------------------------------------------------------------------------------------------------

_PERIODIC: dict[str, dramatiq.Actor] = {}


def periodic(interval: Callable[[], int]) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Make ``func`` run every ``interval()`` seconds as a self-rescheduling actor.

    Each run claims its time slot in the cache first; a second chain (started by another process or a restart)
    finds the slot taken and stops, so chains converge to one. ``start_periodic`` starts them.
    """

    def wrap(func: Callable[[], None]) -> Callable[[], None]:
        name = f"periodic_{func.__module__.replace('.', '_')}_{func.__name__}"

        @dramatiq.actor(actor_name=name, max_retries=0, time_limit=10 * 60 * 1000)
        def run() -> None:
            seconds = max(1, interval())
            slot = math.floor(time.time() / seconds)
            if not cache.add(f"esd:periodic:{name}:{slot}", 1, seconds * 2):
                return
            try:
                func()
            finally:
                run.send_with_options(delay=seconds * 1000)

        _PERIODIC[name] = run
        func.actor = run  # type: ignore[attr-defined]
        return func  # still callable directly for one pass (management commands, tests)

    return wrap


def start_periodic() -> list[str]:
    """Start every periodic chain (the embedded server on start; ``recover_work`` when scaled out)."""
    load_actor_modules()
    for actor in _PERIODIC.values():
        actor.send()
    return sorted(_PERIODIC)
