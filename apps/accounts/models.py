"""Users, roles and API keys."""

from __future__ import annotations

import hashlib
import secrets
import string
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractUser, Group, Permission, UserManager
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models import Prefetch, Q, QuerySet
from django.utils import timezone

from apps.accounts.choices import ApiKeyKind
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
        return self.filter(Q(creator=user.username) | Q(user=user)).distinct()


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


def esd_permission_queryset() -> QuerySet[Permission]:
    return Permission.objects.filter(content_type=ContentType.objects.get_for_model(Role, for_concrete_model=True))


def esd_permissions_prefetch() -> Prefetch:
    """A role's ESD permissions only (an operator may have given a group other Django permissions)."""
    return Prefetch("permissions", queryset=esd_permission_queryset())


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
