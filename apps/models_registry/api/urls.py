from django.urls import re_path

from apps.models_registry.api.views import CheckpointsView, CheckpointView

urlpatterns = [
    re_path(r"^checkpoints/?$", CheckpointsView.as_view(), name="checkpoints"),
    re_path(r"^checkpoints/(?P<id>[^/]+)/?$", CheckpointView.as_view(), name="checkpoint"),
]
