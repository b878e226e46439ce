"""The ESD permission strings and the one table that maps them to Django permissions.

ESD permissions are ``{resource}:{action}``. Each is a Django ``Permission`` of the ``accounts.Role`` model whose
codename *is* the ESD string, so roles (Django groups) carry them natively and the admin can edit them; nothing
else in the code base spells a codename.
"""

from __future__ import annotations

from collections.abc import Iterable

RESOURCES = ("train", "checkpoint", "inference", "sagemaker_endpoint", "user", "role")
ACTIONS = ("all", "list", "create")
PERMISSIONS: tuple[str, ...] = tuple(f"{r}:{a}" for r in RESOURCES for a in ACTIONS)
ALL_PERMISSIONS: frozenset[str] = frozenset(PERMISSIONS)

# What the seeded administrator roles hold (contract §13).
ADMIN_PERMISSIONS: tuple[str, ...] = tuple(f"{r}:all" for r in RESOURCES)


def covers(held: Iterable[str], wanted: str) -> bool:
    """Whether ``held`` includes ``wanted`` for delegation: ``{resource}:all`` covers the resource's actions.

    Used when a caller grants permissions to a role or assigns roles to a user: nobody may hand out more than
    they hold.
    """
    held = set(held)
    return wanted in held or f"{wanted.split(':', 1)[0]}:all" in held


def first_not_covered(held: Iterable[str], wanted: Iterable[str]) -> str | None:
    held = set(held)
    return next((perm for perm in wanted if not covers(held, perm)), None)
