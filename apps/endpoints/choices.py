from django.db import models


class EndpointType(models.TextChoices):
    """Stored types. Requests may also say ``Serverless``, which is refused (contract §9.6)."""

    REAL_TIME = "Real-time"
    ASYNC = "Async"


REQUEST_TYPES = ["Real-time", "Serverless", "Async"]


class EndpointStatus(models.TextChoices):
    CREATING = "Creating"
    IN_SERVICE = "InService"
    UPDATING = "Updating"
    ROLLING_BACK = "RollingBack"
    DELETING = "Deleting"
    DELETED = "Deleted"
    FAILED = "Failed"


class Backend(models.TextChoices):
    SAGEMAKER = "sagemaker"
    SELF_HOSTED = "self-hosted"


# Statuses in which an endpoint takes inference jobs (contract §9.7).
USABLE = (EndpointStatus.IN_SERVICE, EndpointStatus.UPDATING)
