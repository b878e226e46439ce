"""Shared plumbing for background work: enqueue after commit, and re-enqueue what a restart left unfinished.

Rules for every actor (DESIGN.md §4.2): it takes primary keys, exits early when its row is already terminal
(delivery is at least once), and sets ``time_limit`` and ``max_retries`` on purpose.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import dramatiq
from django.apps import apps
from django.db import transaction

log = logging.getLogger("esd.tasks")

_RECOVERERS: dict[str, Callable[[], int]] = {}


def enqueue(actor: dramatiq.Actor, *args: Any, **kwargs: Any) -> None:
    """Send after the surrounding transaction commits, so a worker never reads a row that does not exist yet."""
    transaction.on_commit(lambda: actor.send(*args, **kwargs))


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
    loaded = []
    for config in apps.get_app_configs():
        if not config.name.startswith(("apps.", "esd")):
            continue
        try:
            importlib.import_module(f"{config.name}.tasks")
        except ModuleNotFoundError as exc:
            if exc.name != f"{config.name}.tasks":
                raise
            continue
        loaded.append(f"{config.name}.tasks")
    return loaded


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
