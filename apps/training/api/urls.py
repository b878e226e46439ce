from django.urls import re_path

from apps.training.api.trainings import TrainingsView, TrainingView
from apps.training.api.views import DatasetsView, DatasetView

urlpatterns = [
    re_path(r"^datasets/?$", DatasetsView.as_view(), name="datasets"),
    re_path(r"^datasets/(?P<name>[^/]+)/?$", DatasetView.as_view(), name="dataset"),
    re_path(r"^trainings/?$", TrainingsView.as_view(), name="trainings"),
    re_path(r"^trainings/(?P<id>[^/]+)/?$", TrainingView.as_view(), name="training"),
]
