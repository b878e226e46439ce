"""Typed domain errors and the one exception handler that turns every error into the ESD envelope.

Services raise ``EsdError`` subclasses carrying the ESD status and message; views never build error bodies
themselves. Anything else that escapes is a bug: it is logged with the request id and answered with a 500 that
carries the id, never the traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

log = logging.getLogger("esd.api")

DEFAULT_MESSAGES = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    500: "Internal Server Error",
    504: "Endpoint request timed out",
}


class EsdError(Exception):
    """An error the client caused or may see: status, ESD message and optional per-field ``errors``."""

    status = 400

    def __init__(self, message: str | None = None, *, status: int | None = None, errors: dict | None = None):
        self.status = status or self.status
        self.message = message or DEFAULT_MESSAGES.get(self.status, "")
        self.errors = errors
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"statusCode": self.status, "message": self.message}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


class BadRequest(EsdError):
    status = 400


class Unauthorized(EsdError):
    status = 401


class Forbidden(EsdError):
    status = 403


class NotFound(EsdError):
    status = 404


class GatewayForbidden(EsdError):
    """A missing, invalid, revoked or expired key: ESD's gateway answered a bare ``{"message":"Forbidden"}``."""

    status = 403

    def body(self) -> dict[str, Any]:
        return {"message": "Forbidden"}


class GatewayTimeout(EsdError):
    """A real-time start that waited too long; the body is ESD's gateway text without ``statusCode``."""

    status = 504

    def body(self) -> dict[str, Any]:
        return {"message": "Endpoint request timed out"}


def error_response(exc: EsdError, headers: dict[str, str] | None = None) -> Response:
    return Response(exc.body(), status=exc.status, headers=headers)


def internal_error_body(request_id: str) -> dict[str, Any]:
    return {"statusCode": 500, "message": "Internal Server Error", "requestId": request_id}


def exception_handler(exc: Exception, context: dict) -> Response:
    """DRF exception handler: every exception raised in an API view ends here."""
    if isinstance(exc, EsdError):
        return error_response(exc)
    if isinstance(exc, drf_exceptions.NotAuthenticated | drf_exceptions.AuthenticationFailed):
        return error_response(GatewayForbidden())
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        view = context.get("view")
        allow = ", ".join(view.allowed_methods) if view is not None else ""
        return error_response(EsdError(status=405), headers={"Allow": allow})
    if isinstance(exc, RequestDataTooBig):
        return error_response(EsdError(status=413))
    if isinstance(exc, Http404 | drf_exceptions.NotFound):
        return error_response(NotFound())
    if isinstance(exc, PermissionDenied | drf_exceptions.PermissionDenied):
        return error_response(Forbidden())
    if isinstance(exc, drf_exceptions.APIException):
        return error_response(EsdError(str(exc.detail), status=exc.status_code))
    request = context.get("request")
    request_id = getattr(request, "esd_request_id", "") if request is not None else ""
    log.exception("unhandled error in API view (request id %s)", request_id)
    return Response(internal_error_body(request_id), status=500)
