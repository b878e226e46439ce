from django.urls import re_path

from apps.inference.api.views import InferencesView, InferenceView, StartInferenceView

urlpatterns = [
    re_path(r"^inferences/?$", InferencesView.as_view(), name="inferences"),
    re_path(r"^inferences/(?P<id>[^/]+)/start/?$", StartInferenceView.as_view(), name="inference-start"),
    re_path(r"^inferences/(?P<id>[^/]+)/?$", InferenceView.as_view(), name="inference"),
]
