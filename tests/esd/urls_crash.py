"""The real URLs plus a view that fails, to see what a bug looks like to a client."""

from django.urls import include, path, re_path
from rest_framework.request import Request

from esd.api.views import EsdViewSet, operation
from esd.urls import urlpatterns as real_patterns


class CrashViewSet(EsdViewSet):
    @operation(operation_id="Crash", summary="crash", tags=["Test"], needs_user=False, responses={200: None})
    def list(self, request: Request):
        raise RuntimeError("secret internal detail")


def crash_outside_drf(request):
    raise RuntimeError("secret internal detail")


urlpatterns = [
    re_path(r"^api/crash/?$", CrashViewSet.as_view({"get": "list"})),
    path("api/plain-crash", crash_outside_drf),
    path("", include(real_patterns)),
]
