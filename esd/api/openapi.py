"""OpenAPI documentation built from the same declarations the server enforces.

An action's body schema (the JSON Schema its requests are validated against), its query parameters and its response
serializers are given once, to ``@operation``; this module turns them into drf-spectacular annotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.serializers import Serializer

from esd.api.schemas import ERROR_SCHEMA
from esd.api.serializers import envelope_serializer
from esd.api.validation import BOOLEAN_WORDS, MAX_INT, Query


class EsdAutoSchema(AutoSchema):
    """ESD's bulk ``DELETE`` routes take a JSON body (drf-spectacular documents bodies for PUT/PATCH/POST only),
    and a ``list`` action answers one envelope, never a bare array."""

    def _is_list_view(self, serializer: Any = None) -> bool:
        return False

    def _get_request_body(self, direction: str = "request") -> Any:
        if self.method == "DELETE":
            self.method = "POST"
            try:
                return super()._get_request_body(direction)
            finally:
                self.method = "DELETE"
        return super()._get_request_body(direction)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "apps.accounts.authentication.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "x-api-key",
            "description": "A personal or service key (40 characters) issued in the console or by "
            "`manage.py create_api_key`.",
        }


class SessionScheme(OpenApiAuthenticationExtension):
    target_class = "apps.accounts.authentication.EsdSessionAuthentication"
    name = "ConsoleSession"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict:
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": "sessionid",
            "description": "A console login; unsafe methods also need the CSRF token (X-CSRFToken).",
        }


def bodies_are_required(result: dict, generator: Any, request: Any, public: bool) -> dict:
    """A route whose body has required fields refuses a request without one (an empty body counts as ``{}``), so
    the document says the body is required there; ``PUT /checkpoints/{id}`` (no required field) accepts none."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and "requestBody" in operation:
                schema = operation["requestBody"].get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("required"):
                    operation["requestBody"]["required"] = True
    return result


@dataclass(frozen=True)
class Answer:
    """One documented response of an action: the serializer of its ``data`` (or none), its message, and when."""

    data: type[Serializer] | None = None
    message: str | None = None
    description: str = ""
    data_required: bool = True


_ERROR_DESCRIPTIONS = {
    400: "Invalid request (ESD validator wording) or refused by the route's rules",
    401: "Service key without a (known) acting user",
    403: 'Missing, invalid, revoked or expired key (`{"message":"Forbidden"}`), or no permission',
    404: "Not found or not visible to the caller",
    413: "The body is larger than ESD_MAX_BODY_BYTES",
}

USERNAME_HEADER = OpenApiParameter(
    "username",
    str,
    OpenApiParameter.HEADER,
    required=False,
    description="The acting user. Required with a service key on most routes; with a personal key it may only "
    "name the key's owner.",
)


def _parameter(query: Query) -> OpenApiParameter:
    """A query parameter as the server parses it (``esd.api.validation.parse_query``), bounds included."""
    types: dict[str, Any] = {
        "int": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
        # -1 is ESD's "everything" (capped at the page maximum); larger values are capped too
        "limit": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_INT}, {"type": "integer", "enum": [-1]}]},
        "bool": {"type": "string", "enum": list(BOOLEAN_WORDS)},
    }
    kwargs: dict[str, Any] = {"required": False, "description": query.description}
    if query.kind == "enum":
        kwargs["enum"] = list(query.choices)
    if query.many:
        kwargs["many"] = True
        kwargs["explode"] = True
    return OpenApiParameter(query.name, types.get(query.kind, str), OpenApiParameter.QUERY, **kwargs)


def document(
    *,
    operation_id: str,
    summary: str,
    tags: list[str],
    body: dict | None,  # published with ``additionalProperties: false``: unknown top-level fields are refused
    query: tuple[Query, ...],
    responses: dict[int, Any],
    path_params: tuple[str, ...] = (),
    needs_user: bool = True,
    description: str = "",
) -> Any:
    """``extend_schema`` for one ESD action; ``responses`` maps status to the ``data`` serializer (or None), to an
    ``Answer``, or to a bare ``OpenApiResponse`` (the gateway's 504 without envelope)."""
    documented: dict[int, Any] = {}
    for status, answer in responses.items():
        if status == 204:
            documented[status] = OpenApiResponse(description="No Content")
            continue
        if isinstance(answer, OpenApiResponse):
            documented[status] = answer
            continue
        if not isinstance(answer, Answer):
            answer = Answer(data=answer)
        serializer = envelope_serializer(status, answer.data, answer.message, answer.data_required)
        documented[status] = OpenApiResponse(response=serializer, description=answer.description)
    errors = [400, 401, 403] if needs_user else [400, 403]
    if path_params:
        errors.append(404)
    if body is not None:
        errors.append(413)
    for status in errors:
        documented.setdefault(status, OpenApiResponse(response=ERROR_SCHEMA, description=_ERROR_DESCRIPTIONS[status]))
    parameters = [_parameter(q) for q in query]
    parameters += [OpenApiParameter(name, str, OpenApiParameter.PATH) for name in path_params]
    if needs_user:
        parameters.append(USERNAME_HEADER)
    return extend_schema(
        operation_id=operation_id,
        summary=summary,
        description=description or summary,
        tags=tags,
        request={"application/json": {"additionalProperties": False, **body}} if body is not None else None,
        responses=documented,
        parameters=parameters,
    )
