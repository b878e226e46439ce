"""Console pages of this app (namespace ``console``). Placeholder routes until the pages land."""

from django.http import Http404
from django.urls import path


def _pending(request, **kwargs):
    raise Http404("this console page is not built yet")


urlpatterns = [
    path(route, _pending, name=name)
    for name, route in [("generate", "generate/"), ("job", "jobs/<uuid:pk>/"), ("gallery", "gallery/")]
]
