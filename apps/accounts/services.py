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
    RoleQuota,
    User,
    esd_permission_queryset,
    permissions_of,
)
from apps.accounts.permissions import first_not_covered
from esd.api.errors import BadRequest, Forbidden
from esd.keys import has_control


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


# --- who may manage whom (one rule for the API, the console, the admin and the commands) ---------------------


def is_superuser(username: str) -> bool:
    return User.objects.filter(username=username, is_superuser=True).exists()


def check_may_manage(*, actor: str, actor_permissions: frozenset[str], target: User) -> None:
    """A caller may change, delete or issue keys for only a user it covers: a superuser only by a superuser,
    anybody else only if every permission they hold is one the caller holds. Raises ``Forbidden``.

    Without it, ``user:all`` alone resets an administrator's password and signs in as them.
    """
    if actor == target.username or is_superuser(actor):
        return
    if target.is_superuser:
        raise Forbidden(f"only a superuser may manage superuser {target.username}")
    lacking = first_not_covered(actor_permissions, sorted(permissions_of(target)))
    if lacking is not None:
        raise Forbidden(f"creator has no permission to manage user {target.username}, who holds [{lacking}]")


def check_key_issue(*, issuer: User | None, owner: User, kind: str) -> None:
    """Who may issue which key. A service key acts for any user it names, so only a superuser issues one (in the
    console and the admin; ``manage.py create_api_key`` runs with the server's own rights). A key for somebody
    else needs the right to manage them."""
    if issuer is None:
        return
    if kind == ApiKeyKind.SERVICE and not issuer.is_superuser:
        raise Forbidden("service keys are issued only by superusers")
    if issuer.pk != owner.pk:
        if "user:all" not in permissions_of(issuer):
            raise Forbidden("keys for other users need the user:all permission")
        check_may_manage(actor=issuer.get_username(), actor_permissions=permissions_of(issuer), target=owner)


# --- roles --------------------------------------------------------------------------------------------------


def check_role(
    *, actor: str, actor_permissions: frozenset[str], name: str, permissions: list[str], existing: Role | None
) -> None:
    """The rules of ``POST /roles`` (contract §9.2), in order; raises ``BadRequest``.

    Nobody grants a permission they do not hold - ``role:all`` included, and also on a role they belong to - nor
    rewrites a role that holds more than they do (that would change its members' rights).
    """
    if name == ADMIN_ROLE:
        raise BadRequest("cannot update default role")
    if has_control(name):
        raise BadRequest(f"role name {name!r} is not allowed: it holds a control character")
    if "role:all" not in actor_permissions and existing is not None and existing.creator != actor:
        raise BadRequest(f"creator {actor} not have permission to update role {name}")
    lacking = first_not_covered(actor_permissions, permissions)
    if lacking is None and existing is not None:
        lacking = first_not_covered(actor_permissions, sorted(p.codename for p in existing.permissions.all()))
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


def set_role_quota(role: Role, *, gpu_seconds_per_day: int | None, concurrent_jobs: int | None) -> RoleQuota | None:
    """Set a role's quota (None: unlimited); with no limit left the row goes, so "no row" and "unlimited" agree."""
    if gpu_seconds_per_day is None and concurrent_jobs is None:
        RoleQuota.objects.filter(role=role).delete()
        return None
    quota, _ = RoleQuota.objects.update_or_create(
        role=role, defaults={"gpu_seconds_per_day": gpu_seconds_per_day, "concurrent_jobs": concurrent_jobs}
    )
    return quota


def delete_roles(
    names: list[str], visible: list[Role] | None = None, actor_permissions: frozenset[str] | None = None
) -> int:
    """Delete roles by name (``DELETE /roles``). The admin role, or a role holding a permission the caller does
    not (``actor_permissions``; None: the server itself), refuses the whole request."""
    names = list(dict.fromkeys(names))
    if ADMIN_ROLE in names:
        raise BadRequest("cannot delete default role")
    roles = [r for r in (visible if visible is not None else Role.objects.all()) if r.name in names]
    for role in roles if actor_permissions is not None else ():
        lacking = first_not_covered(actor_permissions, sorted(p.codename for p in role.permissions.all()))
        if lacking is not None:
            raise Forbidden(f"cannot delete role {role.name}: it holds [{lacking}], which you do not")
    for role in roles:
        role.delete()  # also removes the group, its permissions and its memberships
    return len(roles)


# --- users --------------------------------------------------------------------------------------------------


@dataclass
class SavedUser:
    user: User
    created: bool
    roles: list[str]


def check_password(password: str, user: User | None = None, always: bool = False) -> None:
    """Django's validators: always for passwords typed in the console (the admin's forms run them themselves),
    through the API only when ``ESD_PASSWORD_VALIDATION`` is on (ESD's WebUI sets short passwords)."""
    from django.conf import settings

    if not (always or settings.ESD_PASSWORD_VALIDATION):
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
    validate_password: bool = False,
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
        if user is not None and not first_run:
            check_may_manage(actor=actor, actor_permissions=actor_permissions, target=user)
        check_password(password, user or User(username=username), always=validate_password)
        created = user is None
        if created:
            user, created = _create_or_lock(User, username=username, defaults={"creator": creator})
        user.set_password(password)
        user.save()
        user.groups.set(Role.objects.filter(name__in=roles))
    return SavedUser(user=user, created=created, roles=sorted(roles))


def delete_users(
    users: list[User], *, actor: str | None = None, actor_permissions: frozenset[str] = frozenset()
) -> int:
    """Delete users with their API keys (cascade) and their console sessions; their resources stay. With an
    ``actor`` (None: the server itself), every user must be one the actor may manage, or nothing is deleted."""
    if not users:
        return 0
    for user in users if actor is not None else ():
        check_may_manage(actor=actor, actor_permissions=actor_permissions, target=user)
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
    user: User,
    *,
    kind: str = ApiKeyKind.PERSONAL,
    name: str = "",
    expires_days: int | None = None,
    issuer: User | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with the raw secret, which is never stored and cannot be shown again.
    ``issuer`` is the console or admin user asking (:func:`check_key_issue`); None is the server itself."""
    if kind not in ApiKeyKind.values:
        raise ValueError(f"unknown key kind {kind!r}")
    check_key_issue(issuer=issuer, owner=user, kind=kind)
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
