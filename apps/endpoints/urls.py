"""Console pages of this app (namespace ``console``): the endpoint table with its deploy form, and delete."""

from django.urls import path

from apps.endpoints import views

urlpatterns = [
    path("endpoints/", views.endpoints_page, name="endpoints"),
    path("endpoints/live", views.endpoints_live, name="endpoints-live"),
    path("endpoints/<uuid:pk>/delete", views.endpoint_delete, name="endpoint-delete"),
]
