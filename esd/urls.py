"""Root URLs: the ESD API under ``ESD_API_PREFIX``, the admin console, and the API's schema and docs."""

from django.conf import settings
from django.contrib import admin
from django.urls import include, path, re_path

from esd.api.docs import DocsView, SchemaView
from esd.api.routers import api_urls
from esd.api.views import not_found
from esd.storage_views import blob

api_patterns = [
    *api_urls(settings.ESD_API_RESOURCES),
    re_path(r"^schema/?$", SchemaView.as_view(), name="schema"),
    re_path(r"^docs/?$", DocsView.as_view(url_name="schema"), name="docs"),
    # Anything else under the prefix: the ESD 404 envelope, before authentication (contract §2).
    re_path(r"", not_found),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    # The local blob store's presigned URLs (outside the API prefix: no key, no envelope, no body limit).
    path("blob/<path:key>", blob, name="blob"),
    path(settings.ESD_API_PREFIX, include(api_patterns)),
    path("", include("esd.console_urls")),
]
