"""Console pages of this app (namespace ``console``): generate, a job's page and its live part, the gallery."""

from django.urls import path

from apps.inference import views

urlpatterns = [
    path("generate/", views.generate, name="generate"),
    path("jobs/<uuid:pk>/", views.job_page, name="job"),
    path("jobs/<uuid:pk>/live", views.job_live, name="job-live"),
    path("jobs/<uuid:pk>/cancel", views.job_cancel, name="job-cancel"),
    path("gallery/", views.gallery, name="gallery"),
]
