"""The OpenAPI document and Swagger UI, served offline from the sidecar package (contract §9.9).

Public by default; with ``ESD_API_DOCS_PUBLIC=false`` they need a key or a console session like any route.
"""

from django.conf import settings
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import AllowAny, BasePermission, IsAuthenticated

from esd.api.middleware import json_response


class _DocsAccess:
    """Access rule and error format shared by the two views: errors are ESD JSON, never YAML or HTML."""

    content_negotiation_class = DefaultContentNegotiation  # YAML, or JSON with ?format=json

    def get_permissions(self) -> list[BasePermission]:
        return [AllowAny() if settings.ESD_API_DOCS_PUBLIC else IsAuthenticated()]

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        return json_response(response.data, response.status_code)


class SchemaView(_DocsAccess, SpectacularAPIView):
    pass


class DocsView(_DocsAccess, SpectacularSwaggerView):
    pass
