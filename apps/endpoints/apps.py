from django.apps import AppConfig


class EndpointsConfig(AppConfig):
    """Inference endpoints on SageMaker or self-hosted GPU workers."""

    name = "apps.endpoints"
    label = "endpoints"
    verbose_name = "Endpoints"
