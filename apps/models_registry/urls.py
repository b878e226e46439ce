"""Console pages of this app (namespace ``console``): the checkpoint list, its actions and a detail page."""

from django.urls import path

from apps.models_registry import views

urlpatterns = [
    path("models/", views.models_page, name="models"),
    path("models/add-url", views.add_by_url, name="model-add-url"),
    path("models/<uuid:pk>/", views.model_detail, name="model"),
    path("models/<uuid:pk>/row", views.model_row, name="model-row"),
    path("models/<uuid:pk>/status", views.model_status, name="model-status"),
    path("models/<uuid:pk>/rename", views.model_rename, name="model-rename"),
    path("models/<uuid:pk>/delete", views.model_delete, name="model-delete"),
]
