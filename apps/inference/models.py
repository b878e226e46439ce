"""Inference jobs: one request to an endpoint, from parameters to result images in the blob store."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import QuerySet
from django.utils import timezone
from guardian.models import UserObjectPermissionBase

from apps.accounts.grants import GrantPolicy, granted
from apps.accounts.models import User
from apps.inference.choices import InferenceStatus, InferenceType


class InferenceJobQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> InferenceJobQuerySet:
        """Contract §4.2: the owner, or anyone holding ``inference:all``."""
        if "inference:all" in permissions:
            return self.all()
        return self.filter(granted(InferenceJob, "view", user, None))


class InferenceJob(models.Model):
    """A job's row is its state machine (contract §10.3): ``created`` -> ``inprogress`` -> ``succeed``/``failed``.

    The endpoint's name, id and instance type are copied at creation: the job keeps describing where it ran after
    the endpoint is gone. ``output_location`` and ``failure_location`` are where a SageMaker async invocation
    writes; ``progress_*`` is the last step a self-hosted worker reported, ``progress_mark`` the step rate's mark
    (``esd.progress.with_eta``) and the estimate of time left it gave, and ``worker_started`` when a worker took the
    job from its queue (before that a started self-hosted job is queued, and has a queue position).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task_type = models.CharField(max_length=32)
    inference_type = models.CharField(max_length=16, choices=InferenceType.choices)
    status = models.CharField(max_length=16, choices=InferenceStatus.choices, default=InferenceStatus.CREATED)
    owner = models.CharField(max_length=150, db_index=True)
    endpoint = models.ForeignKey(
        "endpoints.Endpoint", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    endpoint_id_copy = models.CharField(max_length=64, blank=True, default="")
    endpoint_name = models.CharField(max_length=63, blank=True, default="")
    instance_type = models.CharField(max_length=100, blank=True, default="")
    backend = models.CharField(max_length=16, blank=True, default="")
    create_time = models.DateTimeField(default=timezone.now)
    start_time = models.DateTimeField(null=True, blank=True)
    complete_time = models.DateTimeField(null=True, blank=True)
    payload_string = models.TextField(null=True, blank=True)
    used_models = models.JSONField(default=dict, blank=True)
    image_names = models.JSONField(default=list, blank=True)
    inference_info_name = models.CharField(max_length=200, null=True, blank=True)
    sagemaker_raw = models.JSONField(null=True, blank=True, help_text="The runtime's failure report")
    output_location = models.CharField(max_length=1024, null=True, blank=True)
    failure_location = models.CharField(max_length=1024, null=True, blank=True)
    progress_step = models.PositiveIntegerField(default=0)
    progress_steps = models.PositiveIntegerField(default=0)
    progress_mark = models.JSONField(null=True, blank=True, help_text="rate_mark and eta_seconds of the progress")
    worker_started = models.DateTimeField(null=True, blank=True)
    runtime_seconds = models.FloatField(null=True, blank=True, help_text="Generation time the runtime reported")
    # Where a finished job's time went (the latency histograms of /metrics), measured where they can be without
    # comparing two machines' clocks: the worker reports how long it ran, the server times the rest.
    queue_seconds = models.FloatField(null=True, blank=True, help_text="From start (dispatch) to the worker's pickup")
    run_seconds = models.FloatField(null=True, blank=True, help_text="From the worker's pickup to its result")
    ingest_seconds = models.FloatField(null=True, blank=True, help_text="From the result's arrival to the job's end")
    gpu_seconds = models.FloatField(
        null=True, blank=True, help_text="Worker time the job used (its share of a batched run): GPU-seconds"
    )

    objects = InferenceJobQuerySet.as_manager()
    # The owner is the creating user; a role of the same name gains nothing (contract §4.2).
    grant_policy = GrantPolicy(owner_lookup="owner", owner_actions=("view", "change", "delete"), roles_may_own=False)

    class Meta:
        indexes = [
            models.Index(fields=["task_type", "-create_time", "-id"], name="inference_by_task"),
            models.Index(fields=["status", "start_time"], name="inference_running"),
            models.Index(fields=["endpoint_id_copy", "status", "start_time"], name="inference_queue"),
            # a user's jobs ended today: the GPU-seconds quota check on every creation (apps.endpoints.usage)
            models.Index(fields=["owner", "complete_time"], name="inference_owner_completed"),
        ]

    def __str__(self) -> str:
        return f"{self.task_type} {self.id} ({self.status})"


class InferenceJobUserObjectPermission(UserObjectPermissionBase):
    """A user's object permission on an inference job (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(InferenceJob, on_delete=models.CASCADE)
