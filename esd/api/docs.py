"""The OpenAPI document and Swagger UI, served offline from the sidecar package (contract §9.9).

Public by default; with ``ESD_API_DOCS_PUBLIC=false`` they need a key or a console session like any route.
"""

from django.conf import settings
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.permissions import AllowAny, IsAuthenticated


def _docs_permissions() -> list:
    return [AllowAny] if settings.ESD_API_DOCS_PUBLIC else [IsAuthenticated]


class SchemaView(SpectacularAPIView):
    content_negotiation_class = DefaultContentNegotiation  # YAML, or JSON with ?format=json

    def get_permissions(self):
        return [p() for p in _docs_permissions()]


class DocsView(SpectacularSwaggerView):
    content_negotiation_class = DefaultContentNegotiation

    def get_permissions(self):
        return [p() for p in _docs_permissions()]
