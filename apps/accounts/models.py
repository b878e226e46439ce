"""Users, roles and API keys."""

from __future__ import annotations

import functools
import hashlib
import secrets
import string
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractUser, Group, Permission, UserManager
from django.contrib.contenttypes.models import ContentType
from django.core.cache import cache
from django.db import connection, connections, models
from django.db.models import Q, QuerySet
from django.utils import timezone

from apps.accounts.choices import ApiKeyKind, WebhookDeliveryStatus, WebhookEvent
from apps.accounts.permissions import ALL_PERMISSIONS, PERMISSIONS

SEED_CREATOR = "ESD"
SEED_USER = "api"
ADMIN_ROLE = "IT Operator"


class UserQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> UserQuerySet:
        """Contract §4.2: ``user:all`` sees everyone; others see themselves and the users they created."""
        if "user:all" in permissions:
            return self.all()
        return self.filter(Q(pk=user.pk) | Q(creator=user.username))


class EsdUserManager(UserManager.from_queryset(UserQuerySet)):  # type: ignore[misc]
    pass


class User(AbstractUser):
    """A person or a service account. ``creator`` is the ESD creator name (a username, or ``ESD`` for seeds).

    ``encrypted_password`` is only filled when an operator turns on ``ESD_WEBUI_PASSWORD_SYNC``: the ESD WebUI
    extension logs users in against its own table and needs the plaintext from the API (contract §9.3).
    """

    creator = models.CharField(max_length=150, blank=True, default="")
    encrypted_password = models.TextField(blank=True, default="", editable=False)

    objects = EsdUserManager()

    def set_password(self, raw_password: str | None) -> None:
        super().set_password(raw_password)
        from apps.accounts.crypto import encrypt_password

        self.encrypted_password = encrypt_password(raw_password)

    def set_unusable_password(self) -> None:
        super().set_unusable_password()
        self.encrypted_password = ""


class RoleQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> RoleQuerySet:
        """Contract §4.2: ``role:all`` sees every role; others the roles they created or hold."""
        if "role:all" in permissions:
            return self.all()
        return self.held_or_created_by(user).distinct()

    def held_by(self, user: User) -> RoleQuerySet:
        return self.filter(user=user)

    def held_or_created_by(self, user: User) -> RoleQuerySet:
        """The caller's roles and the roles they created: what shared resources are matched against."""
        return self.filter(Q(creator=user.username) | Q(user=user))


class Role(Group):
    """An ESD role: a Django group (so users, admin and permission checks work natively) plus its creator.

    The group's permissions are the ESD permission strings; their codenames are declared here once.
    """

    creator = models.CharField(max_length=150, default="")

    objects = RoleQuerySet.as_manager()

    class Meta:
        default_permissions = ()
        permissions = [(perm, perm) for perm in PERMISSIONS]

    @property
    def is_protected(self) -> bool:
        return self.name == ADMIN_ROLE


class RoleQuota(models.Model):
    """What a role's members may use of the GPUs: GPU-seconds per day (the server's ``TIME_ZONE`` day) and jobs
    running at once (inference jobs and trainings together). Empty means unlimited.

    Why per role: companies budget GPUs per team, and roles are the teams here. A member's limit is the most
    generous of their roles' (``quota_of``): holding one role without a limit means no limit, like permissions,
    which are also the union of the roles'. The jobs are counted elsewhere (``apps.endpoints.usage``): this app
    knows roles, not jobs.
    """

    role = models.OneToOneField(Role, on_delete=models.CASCADE, primary_key=True, related_name="quota")
    gpu_seconds_per_day = models.PositiveIntegerField(
        null=True, blank=True, help_text="GPU-seconds each member may use per day (empty: unlimited)"
    )
    concurrent_jobs = models.PositiveIntegerField(
        null=True, blank=True, help_text="Unfinished inference jobs and trainings per member (empty: unlimited)"
    )

    class Meta:
        verbose_name = "quota"

    def __str__(self) -> str:
        return f"quota of {self.role_id}"


@dataclass(frozen=True)
class Quota:
    """One user's limits and the role each comes from (None: unlimited)."""

    gpu_seconds_per_day: int | None = None
    gpu_role: str | None = None
    concurrent_jobs: int | None = None
    concurrent_role: str | None = None

    @property
    def limited(self) -> bool:
        return self.gpu_seconds_per_day is not None or self.concurrent_jobs is not None


UNLIMITED = Quota()


def _most_generous(entries: list[tuple[str, int | None]]) -> tuple[int | None, str | None]:
    """The highest limit and its role (ties: the first role name); unlimited when any role has none."""
    if not entries or any(value is None for _, value in entries):
        return None, None
    name, value = max(sorted(entries), key=lambda entry: entry[1])
    return value, name


def quotas_of(user_ids: Iterable[int] | None = None) -> dict[int, tuple[str, Quota]]:
    """(username, quota) per user id that has any limit, in one query over memberships and quota rows; users who
    hold no role, or a role without a limit, are unlimited and left out. ``None``: every user with a limit."""
    through = User.groups.through.objects
    if user_ids is None:
        limited = through.filter(group__role__quota__isnull=False).values("user_id")
        rows = through.filter(user_id__in=limited)
    else:
        rows = through.filter(user_id__in=list(user_ids))
    memberships: dict[int, tuple[str, list[tuple[str, int | None]], list[tuple[str, int | None]]]] = {}
    for user_id, username, role, gpu, concurrent in rows.values_list(
        "user_id",
        "user__username",
        "group__name",
        "group__role__quota__gpu_seconds_per_day",
        "group__role__quota__concurrent_jobs",
    ):
        entry = memberships.setdefault(user_id, (username, [], []))
        entry[1].append((role, gpu))
        entry[2].append((role, concurrent))
    table: dict[int, tuple[str, Quota]] = {}
    for user_id, (username, gpu, concurrent) in memberships.items():
        quota = Quota(*_most_generous(gpu), *_most_generous(concurrent))
        if quota.limited:
            table[user_id] = (username, quota)
    return table


def quota_of(user: User) -> Quota:
    """A user's limits: the most generous of their roles' (unlimited without roles or with an unlimited one)."""
    return quotas_of([user.pk]).get(user.pk, ("", UNLIMITED))[1]


def held_role_names(user: User) -> list[str]:
    """The names of the roles a user holds; new shared resources are owned by their creator's roles."""
    return sorted(Role.objects.held_by(user).values_list("name", flat=True))


def esd_permission_queryset() -> QuerySet[Permission]:
    return Permission.objects.filter(content_type=ContentType.objects.get_for_model(Role, for_concrete_model=True))


def role_permissions(role_ids: Iterable[int] | None = None) -> dict[int, set[str]]:
    """ESD permissions per role id, in one flat query (no model instances: lists render hundreds of rows)."""
    through = Group.permissions.through.objects.filter(permission__in=esd_permission_queryset())
    if role_ids is not None:
        through = through.filter(group_id__in=role_ids)
    table: dict[int, set[str]] = {}
    for group_id, codename in through.values_list("group_id", "permission__codename"):
        table.setdefault(group_id, set()).add(codename)
    return table


def user_roles(user_ids: Iterable[int]) -> dict[int, list[tuple[int, str]]]:
    """(role id, role name) per user id, in one flat query."""
    table: dict[int, list[tuple[int, str]]] = {}
    rows = User.groups.through.objects.filter(user_id__in=user_ids).values_list("user_id", "group_id", "group__name")
    for user_id, group_id, name in rows:
        table.setdefault(user_id, []).append((group_id, name))
    return table


def permissions_of(user: User) -> frozenset[str]:
    """The union of the user's roles' ESD permissions; Django superusers hold all of them."""
    if user.is_superuser:
        return ALL_PERMISSIONS
    return frozenset(esd_permission_queryset().filter(group__user=user).values_list("codename", flat=True))


KEY_ALPHABET = string.ascii_letters + string.digits
KEY_LENGTH = 40
KEY_PREFIX_LENGTH = 8


def key_digest(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8", "surrogatepass")).hexdigest()


class ApiKeyQuerySet(QuerySet):
    def active(self, now: datetime | None = None) -> ApiKeyQuerySet:
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))

    def for_request(self, raw_key: str) -> ApiKey | None:
        """The key and its owner for one request: from the key cache, else one precompiled query.

        Every API request runs this, so it avoids the ORM: compiling the equivalent query costs ~0.35 ms, more
        than the rest of a ping. The row is cached for ``ESD_KEY_CACHE_SECONDS`` and dropped from the cache
        whenever the key or its owner is saved or deleted (``apps.accounts.signals``). The owner comes back with
        only the fields authentication needs loaded; the others are deferred, exactly as ``.only()`` leaves them.
        """
        digest = key_digest(raw_key)
        ttl = settings.ESD_KEY_CACHE_SECONDS
        row = cache.get(key_cache_name(digest)) if ttl > 0 else None
        if row is None:
            row = self._fetch_row(digest)
            if row is None:
                return None  # misses are not cached: random keys must not fill the cache
            if ttl > 0:
                cache.set(key_cache_name(digest), row, ttl)
        key = dict(zip(_KEY_COLUMNS, row[: len(_KEY_COLUMNS)], strict=True))
        username, is_active, is_superuser = row[len(_KEY_COLUMNS) :]
        api_key = _from_db(ApiKey, self.db, key)
        api_key.user = _from_db(
            User,
            self.db,
            {"id": key["user_id"], "username": username, "is_active": is_active, "is_superuser": is_superuser},
        )
        return api_key

    def _fetch_row(self, digest: str) -> tuple | None:
        with connections[self.db].cursor() as cursor:
            cursor.execute(_key_lookup_sql(), [digest])
            row = cursor.fetchone()
        if row is None:
            return None
        values = list(row)
        for index, name in enumerate(_KEY_COLUMNS):
            if name.endswith("_at"):
                values[index] = _db_datetime(values[index])
        values[-2:] = [bool(values[-2]), bool(values[-1])]  # SQLite answers 0/1
        return tuple(values)


def key_cache_name(digest: str) -> str:
    return f"esd:apikey:{digest}"


_KEY_COLUMNS = ("id", "user_id", "kind", "prefix", "digest", "created_at", "expires_at", "revoked_at", "last_used_at")


@functools.cache
def _key_lookup_sql() -> str:
    q = connection.ops.quote_name
    key, user = ApiKey._meta, User._meta
    columns = ", ".join(f"k.{q(key.get_field(name).column)}" for name in _KEY_COLUMNS)
    owner = ", ".join(f"u.{q(user.get_field(name).column)}" for name in ("username", "is_active", "is_superuser"))
    # Only identifiers from the models' metadata are interpolated; the digest is a bound parameter.
    return (
        f"SELECT {columns}, {owner} FROM {q(key.db_table)} k "  # noqa: S608
        f"JOIN {q(user.db_table)} u ON u.{q(user.pk.column)} = k.{q(key.get_field('user').column)} "
        f"WHERE k.{q(key.get_field('digest').column)} = %s"
    )


def _db_datetime(value: Any) -> datetime | None:
    """A datetime column as the ORM would return it: parsed (SQLite gives text) and aware in UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if timezone.is_aware(value) else timezone.make_aware(value, UTC)


def _from_db(model: type[models.Model], db: str, loaded: dict[str, Any]) -> models.Model:
    """An instance with ``loaded`` fields set and every other field deferred, as ``.only()`` leaves them."""
    names = [f.attname for f in model._meta.concrete_fields if f.attname in loaded]
    return model.from_db(db, names, [loaded[name] for name in names])


class ApiKey(models.Model):
    """An API key. Only its SHA-256 digest is stored: a database leak yields no usable keys.

    ``prefix`` (the first 8 characters) lets people and commands recognise a key without storing it.
    A *service* key belongs to a trusted front end and acts for the user the request names (contract §3.1).
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, default="")
    kind = models.CharField(max_length=10, choices=ApiKeyKind.choices, default=ApiKeyKind.PERSONAL)
    prefix = models.CharField(max_length=KEY_PREFIX_LENGTH, db_index=True, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user.username}, {self.kind})"

    @staticmethod
    def generate() -> str:
        return "".join(secrets.choice(KEY_ALPHABET) for _ in range(KEY_LENGTH))

    def set_key(self, raw_key: str) -> None:
        self.prefix = raw_key[:KEY_PREFIX_LENGTH]
        self.digest = key_digest(raw_key)

    @property
    def is_service(self) -> bool:
        return self.kind == ApiKeyKind.SERVICE

    def is_usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"

    def touch(self, now: datetime) -> None:
        """Record use, at most once per ``ESD_KEY_LAST_USED_RESOLUTION`` seconds: no write on every request."""
        window = timedelta(seconds=settings.ESD_KEY_LAST_USED_RESOLUTION)
        if self.last_used_at is None or now - self.last_used_at >= window:
            ApiKey.objects.filter(pk=self.pk).update(last_used_at=now)
            self.last_used_at = now
            cache.delete(key_cache_name(self.digest))


# --- webhooks ------------------------------------------------------------------------------------------------------


def all_webhook_events() -> list[str]:
    return list(WebhookEvent.values)


class Webhook(models.Model):
    """A URL called when a job of its user ends, or a job of any member of its role (exactly one of the two is set).

    ``secret`` signs every delivery (``X-ESD-Signature``, ``apps.accounts.webhooks``). Unlike API keys it is stored
    in clear: HMAC needs the key itself on every send, so a digest would be useless; it is shown once when the
    webhook is created and never rendered again (console, admin and command show only its first characters).
    """

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="webhooks"
    )
    role = models.ForeignKey(Role, null=True, blank=True, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=2000)
    events = models.JSONField(default=all_webhook_events, help_text="Event names this webhook is called for")
    secret = models.CharField(max_length=100, editable=False)
    active = models.BooleanField(default=True)
    created_by = models.CharField(max_length=150, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=False, role__isnull=True) | Q(user__isnull=True, role__isnull=False),
                name="webhook_user_xor_role",
            )
        ]

    def __str__(self) -> str:
        return f"{self.url} ({self.subscriber})"

    @property
    def subscriber(self) -> str:
        """Whose jobs it reports: ``user NAME`` or ``role NAME``."""
        return f"user {self.user.username}" if self.user_id else f"role {self.role.name}"

    @property
    def secret_hint(self) -> str:
        return f"{self.secret[:4]}…"


class WebhookDelivery(models.Model):
    """One event sent to one webhook: the exact body (every retry sends the same bytes, signed anew) and how its
    attempts went. The row is the delivery's state machine: ``pending`` -> ``delivered`` | ``failed``; a pending
    row with a fresh ``leased_until`` is in flight. ``last_error`` holds the status code or our own words for what
    went wrong, never the receiver's reply body (a URL pointing inside would otherwise read it back)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=32)
    job_id = models.CharField(max_length=64, blank=True, default="", db_index=True)
    body = models.TextField(help_text="The JSON sent, byte for byte")
    status = models.CharField(
        max_length=16, choices=WebhookDeliveryStatus.choices, default=WebhookDeliveryStatus.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    # Set while an attempt is out (``webhooks.attempt`` claims the row, posts outside any transaction, records the
    # answer): another copy of the message skips the row until then. A lease left behind by a crashed worker runs
    # out and the row may be claimed again.
    leased_until = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "webhook deliveries"
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "created_at"], name="webhook_delivery_status")]

    def __str__(self) -> str:
        return f"{self.event} {self.id} ({self.status})"
