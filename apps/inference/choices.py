from django.db import models


class InferenceStatus(models.TextChoices):
    CREATED = "created"
    IN_PROGRESS = "inprogress"
    SUCCEED = "succeed"
    FAILED = "failed"


class InferenceType(models.TextChoices):
    REAL_TIME = "Real-time"
    SERVERLESS = "Serverless"
    ASYNC = "Async"


DIFFUSION_TASKS = ("txt2img", "img2img")
EXTRA_TASKS = ("extra-single-image", "extra-batch-images", "rembg")
TERMINAL = (InferenceStatus.SUCCEED, InferenceStatus.FAILED)
