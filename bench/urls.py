"""The product's URLs plus bare Django views answering the same bytes, as the baseline of the API bench."""

import os
from pathlib import Path

from django.http import HttpRequest, HttpResponse
from django.urls import include, path

PING = b'{"statusCode":200,"message":"pong"}'


def bare_ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse(PING, content_type="application/json")


def bare_users(request: HttpRequest) -> HttpResponse:
    # The exact body GET /api/users returned when the bench started, without auth, queries or DRF.
    return HttpResponse(Path(os.environ["ESD_BENCH_USERS_BODY"]).read_bytes(), content_type="application/json")


urlpatterns = [
    path("bare/ping", bare_ping),
    path("bare/users", bare_users),
    path("", include("esd.urls")),
]
