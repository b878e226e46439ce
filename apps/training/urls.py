"""Console pages of this app (namespace ``console``): trainings with their start form, a training's page, its
live part and delete confirmation, and the datasets."""

from django.urls import path

from apps.training import views

urlpatterns = [
    path("training/", views.trainings, name="trainings"),
    path("training/<uuid:pk>/", views.training_page, name="training"),
    path("training/<uuid:pk>/live", views.training_live, name="training-live"),
    path("training/<uuid:pk>/delete/", views.training_delete, name="training-delete"),
    path("training/<uuid:pk>/resume/", views.training_resume, name="training-resume"),
    path("datasets/", views.datasets, name="datasets"),
]
