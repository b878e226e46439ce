from django.apps import AppConfig


class TrainingConfig(AppConfig):
    """Datasets and LoRA training jobs."""

    name = "apps.training"
    label = "training"
    verbose_name = "Training"

    def ready(self) -> None:
        from apps.accounts import webhooks

        # Ended trainings are sent to webhooks exactly as GET /trainings/{id} shows them.
        webhooks.register_renderer("training", "apps.training.api.trainings.webhook_data")
