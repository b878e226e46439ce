"""Authentication of API requests: ``x-api-key`` first, then the console's session (contract §3).

These classes only establish *who holds the credential*. Which user the request acts for (the ``username`` header,
the legacy bearer) is decided after validation, in ``apps.accounts.access``, as the contract's check order says.
"""

from __future__ import annotations

from django.utils import timezone
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from apps.accounts.models import ApiKey, User


class SessionCredential:
    """``request.auth`` for a console session (an API key is the other kind of credential)."""

    is_service = False

    def __repr__(self) -> str:
        return "<session>"


SESSION = SessionCredential()


class ApiKeyAuthentication(BaseAuthentication):
    """A present ``x-api-key`` decides alone: unknown, revoked or expired keys are refused even with a session."""

    def authenticate(self, request: Request) -> tuple[User, ApiKey] | None:
        raw = request.META.get("HTTP_X_API_KEY")
        if raw is None:
            return None
        key = ApiKey.objects.for_request(raw)
        now = timezone.now()
        if key is None or not key.is_usable(now) or not key.user.is_active:
            raise AuthenticationFailed("Forbidden")
        key.touch(now)
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return "x-api-key"


class EsdSessionAuthentication(SessionAuthentication):
    """Django session login (the console); unsafe methods need the CSRF token as usual."""

    def authenticate(self, request: Request) -> tuple[User, SessionCredential] | None:
        result = super().authenticate(request)
        if result is None:
            return None
        return result[0], SESSION
