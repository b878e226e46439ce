"""Headers, preflight, body limit and last-resort errors for every request under the API prefix.

This sits first in the middleware stack so that even responses produced by other middleware (or a crash) carry
the ESD headers, and so preflights and oversized bodies are answered before any work is done.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable

from django.conf import settings
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse

from esd.api.errors import internal_error_body

log = logging.getLogger("esd.api")

API_VERSION = "1.5.0"
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET,POST,PUT,DELETE,OPTIONS",
    "Access-Control-Allow-Headers": (
        "Content-Type, X-Amz-Date, Authorization, X-Api-Key, X-Amz-Security-Token, X-Amz-User-Agent, username"
    ),
    "Access-Control-Allow-Credentials": "true",
}


BLOB_PREFIX = "/blob/"


def _host_ok(request: HttpRequest) -> bool:
    try:
        request.get_host()
    except DisallowedHost:
        return False
    return True


def json_response(body: dict, status: int) -> HttpResponse:
    return HttpResponse(json.dumps(body, separators=(",", ":")), status=status, content_type="application/json")


class ApiMiddleware:
    """ESD envelope concerns that are not a view's business (contract §1-2)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response
        self.prefix = "/" + settings.ESD_API_PREFIX
        self.max_body = settings.ESD_MAX_BODY_BYTES

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path_info.startswith(BLOB_PREFIX):
            return self._blob(request)
        if not request.path_info.startswith(self.prefix):
            return self.get_response(request)
        request_id = str(uuid.uuid4())
        request.esd_request_id = request_id  # type: ignore[attr-defined]
        if not _host_ok(request):  # Django would answer its HTML 400 from the first middleware that asks
            response = json_response({"statusCode": 400, "message": "Invalid Host header"}, 400)
        elif request.method == "OPTIONS":
            response = HttpResponse(status=204)
        elif self._too_big(request):
            response = json_response({"statusCode": 413, "message": "Request Entity Too Large"}, 413)
        else:
            response = self.get_response(request)
        if response.status_code == 204 and response.has_header("Content-Type"):
            del response["Content-Type"]
        response["x-api-version"] = API_VERSION
        response["x-request-id"] = request_id
        for name, value in CORS_HEADERS.items():
            response[name] = value
        return response

    def _blob(self, request: HttpRequest) -> HttpResponse:
        """The signed-URL view speaks S3's XML errors only: a bad Host here, a crash in ``process_exception``."""
        from esd.storage_views import s3_error

        if not _host_ok(request):
            return s3_error(400, "InvalidArgument", "Invalid Host header.")
        return self.get_response(request)

    def _too_big(self, request: HttpRequest) -> bool:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return False
        return length > self.max_body

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """Views outside DRF (or errors DRF did not catch) still get the envelope and a logged request id."""
        if request.path_info.startswith(BLOB_PREFIX):  # never Django's HTML page on a signed URL
            from esd.storage_views import s3_error

            log.exception("storage request failed: %s %s", request.method, request.path_info)
            return s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
        request_id = getattr(request, "esd_request_id", None)
        if request_id is None:
            return None
        log.exception("unhandled error (request id %s)", request_id)
        return json_response(internal_error_body(request_id), 500)
