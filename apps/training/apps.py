from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """Datasets and LoRA training jobs."""

    name = "apps.training"
    label = "training"
    verbose_name = "Training"
