from django.urls import re_path

from apps.endpoints.api.views import EndpointsView

urlpatterns = [re_path(r"^endpoints/?$", EndpointsView.as_view(), name="endpoints")]
