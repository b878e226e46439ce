"""Console pages of this app (namespace ``console``): the endpoint table with its deploy form, and delete."""

from django.urls import path

from apps.endpoints import dashboard, views

urlpatterns = [
    path("", dashboard.dashboard, name="dashboard"),
    path("dashboard/live", dashboard.dashboard_live, name="dashboard-live"),
    path("endpoints/", views.endpoints_page, name="endpoints"),
    path("endpoints/live", views.endpoints_live, name="endpoints-live"),
    path("endpoints/<uuid:pk>/delete", views.endpoint_delete, name="endpoint-delete"),
    path("usage/", views.usage_page, name="usage"),
]
