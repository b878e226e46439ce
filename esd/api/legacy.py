# TRANSITION ONLY: the APIView handlers of apps not yet on viewsets. Removed when the last app moves.
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string
from rest_framework.request import Request
from rest_framework.views import APIView

from esd.api.errors import DEFAULT_MESSAGES, Forbidden, GatewayForbidden
from esd.api.openapi import document
from esd.api.validation import parse_body, parse_query, validate_body
from esd.api.views import Operation, _raw_body


@dataclass(frozen=True)
class RouteSpec(Operation):
    permissions: tuple[str, ...] = ()


def envelope_schema(status: int, data: dict | None = None, message: str | None = None, data_required: bool = True):
    properties: dict[str, Any] = {"statusCode": {"type": "integer", "enum": [status]}}
    required = ["statusCode"]
    if data is not None:
        properties["data"] = data
        if data_required:
            required.append("data")
    properties["message"] = {"type": "string", "example": message or DEFAULT_MESSAGES.get(status, "")}
    return {"type": "object", "properties": properties, "required": required}


def route(*, operation_id, summary, tags, responses, path_params=(), description="", **spec):
    from drf_spectacular.utils import OpenApiResponse

    route_spec = RouteSpec(**spec)
    responses = {
        s: (d if d is None or isinstance(d, OpenApiResponse) else OpenApiResponse(response=envelope_schema(s, d)))
        for s, d in responses.items()
    }
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

    def decorate(handler):
        handler.route_spec = route_spec
        return documented(handler)

    return decorate


class EsdView(APIView):
    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        method = request.method.lower()
        spec = getattr(getattr(self, method, None), "route_spec", None)
        if spec is None or method not in self.http_method_names:
            self.http_method_not_allowed(request)
        self.format_kwarg = None
        request.accepted_renderer, request.accepted_media_type = self.perform_content_negotiation(request)
        if request.auth is None:
            raise GatewayForbidden()
        request.esd_operation = spec
        request.esd_query = parse_query(spec.query, request.query_params, settings.ESD_PAGE_MAX)
        request.esd_body = validate_body(spec.body, parse_body(_raw_body(request))) if spec.body is not None else {}
        self.validate(request, spec)
        import_string("apps.accounts.access.ActingUser")().has_permission(request, self)
        if spec.permissions and not request.esd_first_run and request.esd_permissions.isdisjoint(spec.permissions):
            raise Forbidden(f"User {request.user.username} has no permissions: {list(spec.permissions)!r}")

    def validate(self, request: Request, spec: RouteSpec) -> None:
        pass

    def visible(self, model):
        return model.objects.visible_to(self.request.user, self.request.esd_permissions)
