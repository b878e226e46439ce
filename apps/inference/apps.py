from django.apps import AppConfig


class InferenceConfig(AppConfig):
    """Inference jobs: create, start, dispatch, results."""

    name = "apps.inference"
    label = "inference"
    verbose_name = "Inference"
