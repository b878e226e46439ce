from django.db import models


class DatasetStatus(models.TextChoices):
    """Of a dataset and of each of its files (contract §10.4)."""

    INITIALED = "Initialed"
    ENABLED = "Enabled"
    DISABLED = "Disabled"


class TrainingStatus(models.TextChoices):
    """Self-hosted statuses; SageMaker jobs may also show its secondary statuses verbatim (contract §7)."""

    INITIAL = "Initial"
    STARTING = "Starting"
    DOWNLOADING = "Downloading"
    TRAINING = "Training"
    UPLOADING = "Uploading"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STOPPED = "Stopped"


TERMINAL_TRAINING = ("Completed", "Failed", "Stopped", "MaxRuntimeExceeded")
# A run's stages in order: events are handled concurrently, so a late one never moves a run back a stage.
RUN_STAGES = ("Starting", "Downloading", "Training", "Uploading")
FM_TYPES = {"sd_1_5": "kohya_config_cloud.toml", "sd_xl": "kohya_config_cloud_xl.toml"}
