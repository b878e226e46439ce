from django.db import models


class DatasetStatus(models.TextChoices):
    """Of a dataset and of each of its files (contract §10.4)."""

    INITIALED = "Initialed"
    ENABLED = "Enabled"
    DISABLED = "Disabled"
