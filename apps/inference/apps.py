from django.apps import AppConfig


class InferenceConfig(AppConfig):
    """Inference jobs: create, start, dispatch, results."""

    name = "apps.inference"
    label = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        # Connects the receiver that fails the jobs of a deleted endpoint, in every process that deletes one.
        from apps.accounts import webhooks
        from apps.inference import tasks  # noqa: F401

        webhooks.register_renderer("inference", "apps.inference.api.views.webhook_data")
