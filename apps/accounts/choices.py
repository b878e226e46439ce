from django.db import models


class ApiKeyKind(models.TextChoices):
    """Personal keys act as their owner; service keys act for the user a trusted front end names (§3.1)."""

    PERSONAL = "personal", "Personal"
    SERVICE = "service", "Service"
