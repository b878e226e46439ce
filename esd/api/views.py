"""The base viewset of every ESD resource: the one place where the check order of contract §3.3 is applied.

1. route (404/405) -> 2. key or session (403) -> 3. body and query validation (400) -> 4. acting user
(401/403) -> 5. permission (403) -> 6. the action, which reads rows through ``get_queryset()`` only.

Actions declare what they need with ``@operation(...)`` (body schema, query parameters, acting-user rules) and the
viewset declares the ESD permission strings per action in ``required``. Steps 4 and 5 are DRF permission classes
named in ``REST_FRAMEWORK["DEFAULT_PERMISSION_CLASSES"]`` (the accounts app owns them), so no action
authenticates, validates or checks a permission by hand and none can forget to.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse
from django.http.request import RawPostDataException
from rest_framework.exceptions import MethodNotAllowed
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.viewsets import GenericViewSet

from esd.api.errors import DEFAULT_MESSAGES, GatewayForbidden, NotFound
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
class Operation:
    """What an action needs before it runs (contract §3-§5), besides its permission strings."""

    body: dict | None = None
    query: tuple[Query, ...] = ()
    # A service key naming no user acts as its own user on the routes ESD served without one (§3.1).
    keyless_user_ok: bool = False
    # POST /users and POST /roles: `initial: true` during first run skips user and permission checks (§13).
    first_run_initial: bool = False
    needs_user: bool = True


def operation(
    *,
    operation_id: str,
    summary: str,
    tags: list[str],
    responses: dict[int, Any],
    path_params: tuple[str, ...] = (),
    description: str = "",
    **spec: Any,
) -> Callable[[Callable], Callable]:
    """Declare an action: its ``Operation`` (enforced by ``EsdViewSet``) and its OpenAPI documentation."""
    declared = Operation(**spec)
    documented = document(
        operation_id=operation_id,
        summary=summary,
        tags=tags,
        body=declared.body,
        query=declared.query,
        responses=responses,
        path_params=path_params,
        needs_user=declared.needs_user,
        description=description,
    )

    def decorate(handler: Callable) -> Callable:
        handler.operation = declared  # type: ignore[attr-defined]
        return documented(handler)

    return decorate


class EsdViewSet(GenericViewSet):
    """Base of every API resource. Subclasses set ``model`` and ``required`` and define actions with
    ``@operation``: ``list``/``create``/``bulk_destroy`` on the collection, ``retrieve``/``update`` on one object,
    ``@action`` for the rest (``EsdRouter`` maps them)."""

    model: ClassVar[type[Model]]
    # ESD permission strings per action: any one suffices (contract §4.1), checked by the permission classes.
    required: ClassVar[dict[str, tuple[str, ...]]] = {}
    # The 404 message of each single-object action, formatted with the path's kwargs (contract §9).
    not_found: ClassVar[dict[str, str]] = {}
    lookup_field = "pk"
    lookup_url_kwarg = "id"
    lookup_value_regex = "[^/]+"
    pagination_class = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """An action that acts for a user must say which ESD permissions it needs: a forgotten entry would
        otherwise let every key holder through (fail closed, when the class is defined)."""
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            spec = getattr(getattr(cls, name, None), "operation", None)
            if isinstance(spec, Operation) and spec.needs_user and name not in cls.required:
                raise ImproperlyConfigured(f"{cls.__name__}.{name} acts for a user but is missing from `required`")

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        handler = getattr(self, request.method.lower(), None)
        spec: Operation | None = getattr(handler, "operation", None)
        if spec is None or request.method.lower() not in self.http_method_names:
            raise MethodNotAllowed(request.method)
        self.format_kwarg = None
        request.accepted_renderer, request.accepted_media_type = self.perform_content_negotiation(request)
        # 2. key or session: the authentication classes raise for a bad key; no credentials at all is 403 too.
        if request.auth is None:
            raise GatewayForbidden()
        # 3. validation
        request.esd_operation = spec
        request.esd_query = parse_query(spec.query, request.query_params, settings.ESD_PAGE_MAX)
        request.esd_body = validate_body(spec.body, parse_body(_raw_body(request))) if spec.body is not None else {}
        self.validate(request, spec)
        # 4-5. acting user and permission: DRF's permission classes, in the order the settings name them
        self.check_permissions(request)

    def validate(self, request: Request, spec: Operation) -> None:
        """Hook for action-specific syntactic checks that the schema cannot express (still step 3)."""

    @property
    def required_permissions(self) -> tuple[str, ...]:
        return self.required.get(self.action, ())

    # Reading rows --------------------------------------------------------------------------------------------
    def get_queryset(self) -> QuerySet:
        """The visibility chokepoint (contract §4.2): every action reads the model's rows through this."""
        if getattr(self, "swagger_fake_view", False):  # drf-spectacular inspecting the class
            return self.model.objects.none()
        return self.model.objects.visible_to(self.request.user, self.request.esd_permissions)

    def get_object(self, queryset: QuerySet | None = None) -> Any:
        """The one visible row the path names, else the action's own 404 (a malformed id is simply not found)."""
        value = self.kwargs[self.lookup_url_kwarg or self.lookup_field]
        found = find(self.get_queryset() if queryset is None else queryset, **{self.lookup_field: value})
        if found is None:
            raise NotFound(self.not_found[self.action].format(**self.kwargs))
        return found


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
