from django.apps import AppConfig


class ModelsRegistryConfig(AppConfig):
    """Checkpoints (models) and their upload and download flows."""

    name = "apps.models_registry"
    label = "models_registry"
    verbose_name = "Model registry"
