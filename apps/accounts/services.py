"""Account operations. The API, the admin and the management commands all call these, so each rule lives once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth import password_validation
from django.contrib.auth.hashers import UNUSABLE_PASSWORD_PREFIX
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Model
from django.utils import timezone

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import (
    ADMIN_ROLE,
    SEED_CREATOR,
    SEED_USER,
    ApiKey,
    Role,
    User,
    esd_permission_queryset,
)
from apps.accounts.permissions import first_not_covered
from esd.api.errors import BadRequest, Forbidden


def is_first_run() -> bool:
    """Contract §13: first run lasts while no user other than the seeded ``api`` user has a password."""
    return not (
        User.objects.exclude(username=SEED_USER)
        .exclude(password="")
        .exclude(password__startswith=UNUSABLE_PASSWORD_PREFIX)
        .exists()
    )


def _create_or_lock(model: type[Model], defaults: dict, **lookup: str) -> tuple[Any, bool]:
    """Create a row, or lock the one a concurrent request created first (a unique name is the only key).

    "Create or replace" routes must not answer 500 when two clients create the same name at once.
    """
    try:
        with transaction.atomic():
            return model.objects.create(**lookup, **defaults), True
    except IntegrityError:
        return model.objects.select_for_update().get(**lookup), False


# --- roles --------------------------------------------------------------------------------------------------


def check_role(
    *, actor: str, actor_permissions: frozenset[str], name: str, permissions: list[str], existing: Role | None
) -> None:
    """The rules of ``POST /roles`` (contract §9.2), in order; raises ``BadRequest``."""
    if name == ADMIN_ROLE:
        raise BadRequest("cannot update default role")
    if "role:all" in actor_permissions:
        return
    if existing is not None and existing.creator != actor:
        raise BadRequest(f"creator {actor} not have permission to update role {name}")
    lacking = first_not_covered(actor_permissions, permissions)
    if lacking is not None:
        raise BadRequest(f"creator {actor} have not permission to create role with permission: [{lacking}]")


def save_role(
    *, actor: str, actor_permissions: frozenset[str], name: str, permissions: list[str], checked: bool = True
) -> tuple[Role, bool]:
    """Create or replace a role (``POST /roles``). Returns the role and whether it was created.

    ``checked=False`` is for first-run ``initial`` requests, which need only a valid key. Replacing keeps the
    original creator: an administrator editing a role does not take it over.
    """
    with transaction.atomic():
        role = Role.objects.select_for_update().filter(name=name).first()
        if checked:
            check_role(
                actor=actor, actor_permissions=actor_permissions, name=name, permissions=permissions, existing=role
            )
        elif name == ADMIN_ROLE:
            raise BadRequest("cannot update default role")
        created = role is None
        if created:
            role, created = _create_or_lock(Role, name=name, defaults={"creator": actor})
        role.permissions.set(esd_permission_queryset().filter(codename__in=set(permissions)))
    return role, created


def delete_roles(names: list[str], visible: list[Role] | None = None) -> int:
    """Delete roles by name (``DELETE /roles``). The admin role refuses the whole request."""
    names = list(dict.fromkeys(names))
    if ADMIN_ROLE in names:
        raise BadRequest("cannot delete default role")
    roles = [r for r in (visible if visible is not None else Role.objects.all()) if r.name in names]
    for role in roles:
        role.delete()  # also removes the group, its permissions and its memberships
    return len(roles)


# --- users --------------------------------------------------------------------------------------------------


@dataclass
class SavedUser:
    user: User
    created: bool
    roles: list[str]


def check_password(password: str, user: User | None = None) -> None:
    """Django's validators, when ``ESD_PASSWORD_VALIDATION`` is on (the API sets none by default, as ESD)."""
    from django.conf import settings

    if not settings.ESD_PASSWORD_VALIDATION:
        return
    try:
        password_validation.validate_password(password, user)
    except ValidationError as exc:
        raise BadRequest("password is not strong enough: " + " ".join(exc.messages)) from exc


def save_user(
    *,
    actor: str,
    actor_permissions: frozenset[str],
    username: str,
    password: str,
    roles: list[str],
    first_run: bool = False,
) -> SavedUser:
    """Create or replace a user (``POST /users``): password and roles replaced, creator set on create."""
    if first_run:
        roles, creator = [ADMIN_ROLE], SEED_CREATOR
    else:
        creator = actor
        roles = list(dict.fromkeys(roles))
        existing = list(Role.objects.filter(name__in=roles).prefetch_related("permissions"))
        wanted = sorted({p.codename for role in existing for p in role.permissions.all()})
        lacking = first_not_covered(actor_permissions, wanted)
        if lacking is not None:
            raise Forbidden(f"creator has no permission to assign permission [{lacking}] to others")
        known = {role.name for role in existing}
        missing = next((r for r in roles if r not in known), None)
        if missing is not None:
            raise BadRequest(f'user roles "{missing}" not exist')
    with transaction.atomic():
        user = User.objects.select_for_update().filter(username=username).first()
        check_password(password, user or User(username=username))
        created = user is None
        if created:
            user, created = _create_or_lock(User, username=username, defaults={"creator": creator})
        user.set_password(password)
        user.save()
        user.groups.set(Role.objects.filter(name__in=roles))
    return SavedUser(user=user, created=created, roles=sorted(roles))


def delete_users(users: list[User]) -> int:
    """Delete users with their API keys (cascade) and their console sessions; their resources stay."""
    if not users:
        return 0
    ids = {str(u.pk) for u in users}
    with transaction.atomic():
        User.objects.filter(pk__in=[u.pk for u in users]).delete()
    _delete_sessions(ids)
    return len(users)


def _delete_sessions(user_ids: set[str]) -> None:
    stale = [
        s.session_key
        for s in Session.objects.filter(expire_date__gt=timezone.now()).iterator()
        if s.get_decoded().get("_auth_user_id") in user_ids
    ]
    Session.objects.filter(session_key__in=stale).delete()


# --- API keys -----------------------------------------------------------------------------------------------


def issue_api_key(
    user: User, *, kind: str = ApiKeyKind.PERSONAL, name: str = "", expires_days: int | None = None
) -> tuple[ApiKey, str]:
    """Create a key and return it with the raw secret, which is never stored and cannot be shown again."""
    if kind not in ApiKeyKind.values:
        raise ValueError(f"unknown key kind {kind!r}")
    if expires_days is not None and expires_days < 1:
        raise ValueError("expires_days must be at least 1")
    raw = ApiKey.generate()
    key = ApiKey(user=user, kind=kind, name=name)
    key.set_key(raw)
    if expires_days is not None:
        key.expires_at = timezone.now() + timedelta(days=expires_days)
    key.save()
    return key, raw


def revoke_api_key(key: ApiKey) -> bool:
    """Revoke one key; revoking twice keeps the first revocation time. Returns whether it changed."""
    if key.revoked_at is not None:
        return False
    key.revoked_at = timezone.now()
    key.save(update_fields=["revoked_at"])
    return True
