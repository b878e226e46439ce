from django.db import models


class ApiKeyKind(models.TextChoices):
    """Personal keys act as their owner; service keys act for the user a trusted front end names (§3.1)."""

    PERSONAL = "personal", "Personal"
    SERVICE = "service", "Service"


class WebhookEvent(models.TextChoices):
    """What a webhook may be called for: a job of its user (or of a member of its role) reaching a final status."""

    INFERENCE_ENDED = "inference.ended", "An inference job ended"
    TRAINING_ENDED = "training.ended", "A training job ended"


# Sent only by ``manage.py webhooks test`` and the console's Test button; a webhook cannot subscribe to it.
PING_EVENT = "ping"


class WebhookDeliveryStatus(models.TextChoices):
    """A delivery is ``pending`` until a 2xx answer (``delivered``) or a final failure (``failed``)."""

    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"
