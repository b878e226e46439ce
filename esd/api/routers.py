"""The one router of the API: ESD's URL shapes on DRF viewsets.

ESD deletes in bulk with a body on the collection URL (``DELETE /checkpoints`` with ``checkpoint_id_list``), so
the collection route maps ``DELETE`` to a ``bulk_destroy`` action, as NetBox's router maps its bulk operations.
A trailing slash is optional and both forms are served directly: a redirect would lose DELETE bodies.
"""

from __future__ import annotations

from django.urls import URLPattern
from django.utils.module_loading import import_string
from rest_framework.routers import DynamicRoute, Route, SimpleRouter


class EsdRouter(SimpleRouter):
    routes = [
        Route(
            url=r"^{prefix}{trailing_slash}$",
            mapping={"get": "list", "post": "create", "delete": "bulk_destroy"},
            name="{basename}-list",
            detail=False,
            initkwargs={"suffix": "List"},
        ),
        DynamicRoute(
            url=r"^{prefix}/{url_path}{trailing_slash}$", name="{basename}-{url_name}", detail=False, initkwargs={}
        ),
        Route(
            url=r"^{prefix}/{lookup}{trailing_slash}$",
            mapping={"get": "retrieve", "put": "update", "delete": "destroy"},
            name="{basename}-detail",
            detail=True,
            initkwargs={"suffix": "Instance"},
        ),
        DynamicRoute(
            url=r"^{prefix}/{lookup}/{url_path}{trailing_slash}$",
            name="{basename}-{url_name}",
            detail=True,
            initkwargs={},
        ),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.trailing_slash = "/?"


def api_urls(resources: dict[str, str]) -> list[URLPattern]:
    """The router's URLs for ``{prefix: "dotted.path.to.ViewSet"}`` (``ESD_API_RESOURCES``: apps plug in there)."""
    router = EsdRouter()
    for prefix, dotted in resources.items():
        viewset = import_string(dotted)
        router.register(prefix, viewset, basename=getattr(viewset, "basename", prefix))
    return router.urls
