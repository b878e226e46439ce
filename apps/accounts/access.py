"""Steps 4 and 5 of the check order (contract §3.3): who the request acts for, and may they.

Both are DRF permission classes (``REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"]``), run by the base viewset after
validation. ``ActingUser`` is the only code that reads the ``username`` header or the legacy bearer;
``HoldsRequiredPermission`` the only code that compares a caller's permissions with an action's.
"""

from __future__ import annotations

import binascii
from typing import TYPE_CHECKING

from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from apps.accounts.models import User, permissions_of
from apps.accounts.services import is_first_run
from esd.api.errors import Forbidden, Unauthorized

if TYPE_CHECKING:  # esd.api.views imports DRF's views, which import these classes from the settings
    from esd.api.views import Operation


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


def acting_user(request: Request, spec: Operation) -> User:
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


class ActingUser(BasePermission):
    """Step 4: set ``request.user`` to the acting user and ``request.esd_permissions`` (401/403 per §3.1).

    First-run ``initial`` requests (§13) act for nobody and skip step 5 with an empty permission set.
    """

    def has_permission(self, request: Request, view: object) -> bool:
        spec: Operation = request.esd_operation
        request.esd_first_run = False
        if not spec.needs_user:
            request.esd_permissions = frozenset()
            return True
        if spec.first_run_initial and request.esd_body.get("initial") is True and is_first_run():
            # The WebUI's "Test Connection & Update Setting" names the administrator it is about to create.
            request.esd_first_run = True
            request.esd_permissions = frozenset()
            return True
        user = acting_user(request, spec)
        request.user = user
        request.esd_permissions = permissions_of(user)
        return True


class HoldsRequiredPermission(BasePermission):
    """Step 5: any one of the action's ESD permission strings (``view.required``) suffices (contract §4.1)."""

    def has_permission(self, request: Request, view: object) -> bool:
        required: tuple[str, ...] = view.required_permissions  # type: ignore[attr-defined]
        if required and not request.esd_first_run and request.esd_permissions.isdisjoint(required):
            raise Forbidden(f"User {request.user.username} has no permissions: {list(required)!r}")
        return True
