"""The base view of every ESD route: the one place where the check order of contract §3.3 is applied.

1. route (404/405) -> 2. key or session (403) -> 3. body and query validation (400) -> 4. acting user
(401/403) -> 5. permission (403) -> 6. the handler, which reads querysets through ``visible()`` only.

Handlers declare what they need with ``@route(...)``; no handler authenticates, validates or checks a
permission by hand, so none can forget to.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from django.utils.module_loading import import_string
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from esd.api.errors import DEFAULT_MESSAGES, GatewayForbidden
from esd.api.middleware import json_response
from esd.api.openapi import document
from esd.api.validation import Query, parse_body, parse_query, validate_body


def envelope(status: int = 200, data: Any = None, message: str | None = None) -> Response:
    """``{"statusCode", "data", "message"}`` with ``data`` omitted when None and ``message`` when empty."""
    if status == 204:
        return Response(status=204)
    body: dict[str, Any] = {"statusCode": status}
    if data is not None:
        body["data"] = data
    message = DEFAULT_MESSAGES.get(status, "") if message is None else message
    if message:
        body["message"] = message
    return Response(body, status=status)


@dataclass(frozen=True)
class RouteSpec:
    """What a handler needs before it runs (contract §3-§5)."""

    permissions: tuple[str, ...] = ()
    body: dict | None = None
    query: tuple[Query, ...] = ()
    # A service key naming no user acts as its own user on the routes ESD served without one (§3.1).
    keyless_user_ok: bool = False
    # POST /users and POST /roles: `initial: true` during first run skips user and permission checks (§13).
    first_run_initial: bool = False
    needs_user: bool = True


def route(
    *,
    operation_id: str,
    summary: str,
    tags: list[str],
    responses: dict[int, Any],
    path_params: tuple[str, ...] = (),
    description: str = "",
    **spec: Any,
) -> Callable[[Callable], Callable]:
    """Declare a handler: its ``RouteSpec`` (enforced by ``EsdView``) and its OpenAPI documentation."""
    route_spec = RouteSpec(**spec)
    documented = document(
        operation_id=operation_id,
        summary=summary,
        tags=tags,
        body=route_spec.body,
        query=route_spec.query,
        responses=responses,
        path_params=path_params,
        needs_user=route_spec.needs_user,
        description=description,
    )

    def decorate(handler: Callable) -> Callable:
        handler.route_spec = route_spec  # type: ignore[attr-defined]
        return documented(handler)

    return decorate


class EsdView(APIView):
    """Base of every API view. Subclasses define ``get``/``post``/... decorated with ``@route``."""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        method = request.method.lower()
        spec: RouteSpec | None = getattr(getattr(self, method, None), "route_spec", None)
        if spec is None or method not in self.http_method_names:
            self.http_method_not_allowed(request)
        self.format_kwarg = None
        request.accepted_renderer, request.accepted_media_type = self.perform_content_negotiation(request)
        # 2. key or session: the authentication classes raise for a bad key; no credentials at all is 403 too.
        if request.auth is None:
            raise GatewayForbidden()
        # 3. validation
        request.esd_query = parse_query(spec.query, request.query_params, settings.ESD_PAGE_MAX)
        request.esd_body = validate_body(spec.body, parse_body(_raw_body(request))) if spec.body is not None else {}
        self.validate(request, spec)
        # 4-5. acting user and permission: the accounts app owns the rules, named by ESD_AUTHORIZE
        import_string(settings.ESD_AUTHORIZE)(request, spec)

    def validate(self, request: Request, spec: RouteSpec) -> None:
        """Hook for route-specific syntactic checks that the schema cannot express (still step 3)."""

    # Helpers for handlers -------------------------------------------------------------------------------
    def visible(self, model: type[Model]) -> QuerySet:
        """The only way a handler reads objects: the caller's visibility rule of contract §4.2."""
        return model.objects.visible_to(self.request.user, self.request.esd_permissions)


def find(queryset: QuerySet, **lookup: Any) -> Any:
    """One row or None. Path ids are never format-checked: a malformed id is simply not found (contract §1)."""
    try:
        return queryset.filter(**lookup).first()
    except (ValidationError, ValueError, TypeError):
        return None


def uuid_list(values: list[str]) -> list[uuid.UUID]:
    """The well-formed UUIDs of a bulk request, de-duplicated; others cannot name anything and are skipped."""
    found: dict[uuid.UUID, None] = {}
    for value in values:
        try:
            found[uuid.UUID(value)] = None
        except ValueError:
            continue
    return list(found)


def _raw_body(request: Request) -> bytes | None:
    try:
        return request._request.body
    except RawPostDataException:  # a form body already consumed as a stream: not a JSON object anyway
        return None


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Unknown path under the API prefix: 404 in the envelope, before authentication (contract §2)."""
    return json_response({"statusCode": 404, "message": "Not Found"}, 404)
