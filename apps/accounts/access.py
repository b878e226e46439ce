"""Steps 4 and 5 of the check order (contract §3.3): who the request acts for, and may they.

``authorize`` is called by the base view for every route; it is the only code that reads the ``username`` header
or the legacy bearer, and the only code that compares a caller's permissions with a route's.
"""

from __future__ import annotations

import binascii

from rest_framework.request import Request

from apps.accounts.models import User, permissions_of
from apps.accounts.services import is_first_run
from esd.api.errors import Forbidden, Unauthorized
from esd.api.views import RouteSpec


def named_user(request: Request) -> str | None:
    """The user a request names: the ``username`` header, else the hex-encoded legacy bearer token."""
    header = request.headers.get("username", "").strip()
    if header:
        return header
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        return bytes.fromhex(token.strip()).decode("utf-8") or None
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return None  # invalid hex counts as no user


def acting_user(request: Request, spec: RouteSpec) -> User:
    holder: User = request.user
    credential = request.auth
    name = named_user(request)
    if not credential.is_service:
        # Personal key or session: the holder acts; naming anybody else is refused.
        if name is not None and name != holder.username:
            raise Forbidden(f"API key does not belong to user {name}")
        return holder
    if name is None:
        if spec.keyless_user_ok:
            return holder
        raise Unauthorized()
    user = User.objects.filter(username=name, is_active=True).first()
    if user is None:
        raise Unauthorized()
    return user


def authorize(request: Request, spec: RouteSpec) -> None:
    """Set ``request.user`` to the acting user and ``request.esd_permissions``; raise 401/403 per §3-§4."""
    request.esd_first_run = False
    if not spec.needs_user:
        request.esd_permissions = frozenset()
        return
    if spec.first_run_initial and request.esd_body.get("initial") is True and is_first_run():
        # The WebUI's "Test Connection & Update Setting" names the administrator it is about to create.
        request.esd_first_run = True
        request.esd_permissions = frozenset()
        return
    user = acting_user(request, spec)
    request.user = user
    permissions = permissions_of(user)
    request.esd_permissions = permissions
    if spec.permissions and permissions.isdisjoint(spec.permissions):
        raise Forbidden(f"User {user.username} has no permissions: {list(spec.permissions)!r}")
