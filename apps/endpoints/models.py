"""Inference endpoints: SageMaker endpoints or queues served by our own GPU workers."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q, QuerySet
from django.utils import timezone
from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

from apps.accounts.grants import GrantPolicy, granted
from apps.accounts.models import Role, User
from apps.endpoints.choices import Backend, EndpointStatus, EndpointType
from esd.owners import OwnerEntry


class EndpointQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> EndpointQuerySet:
        """Contract §4.2: ``sagemaker_endpoint:all`` sees all; others endpoints owned by a role they hold or
        created, or by their name."""
        if "sagemaker_endpoint:all" in permissions:
            return self.all()
        roles = Role.objects.held_or_created_by(user).values("pk")
        return self.filter(granted(Endpoint, "view", user, roles))

    def usable_by(self, user: User) -> EndpointQuerySet:
        """Endpoints whose owners share a role with ``user`` or name them (the inference scheduling rule)."""
        return self.filter(granted(Endpoint, "view", user, Role.objects.held_by(user).values("pk")))

    def changeable_by(self, user: User, permissions: frozenset[str]) -> EndpointQuerySet:
        visible = self.visible_to(user, permissions)
        if "sagemaker_endpoint:all" in permissions:
            return visible
        return visible.filter(granted(Endpoint, "change", user, None))

    def live(self) -> EndpointQuerySet:
        """Every endpoint that still exists somewhere (a Failed one counts: its name and quota are taken)."""
        return self.exclude(status=EndpointStatus.DELETED)


class Endpoint(models.Model):
    """An inference endpoint. ``name`` is the deployed name (``esd-{type}-{short}``): the SageMaker endpoint, or
    the dramatiq queue self-hosted workers consume.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=63)
    endpoint_type = models.CharField(max_length=16, choices=EndpointType.choices)
    backend = models.CharField(max_length=16, choices=Backend.choices)
    status = models.CharField(max_length=16, choices=EndpointStatus.choices, default=EndpointStatus.CREATING)
    instance_type = models.CharField(max_length=100)
    initial_instance_count = models.PositiveIntegerField(default=1)
    min_instance_number = models.PositiveIntegerField(default=0)
    max_instance_number = models.PositiveIntegerField(default=1)
    autoscaling = models.BooleanField(default=False)
    autoscaling_applied = models.BooleanField(default=False)
    current_instance_count = models.PositiveIntegerField(default=0)
    custom_extensions = models.TextField(blank=True, default="")
    custom_docker_image_uri = models.CharField(max_length=512, blank=True, default="")
    creator = models.CharField(max_length=150)
    start_time = models.DateTimeField(default=timezone.now)
    end_time = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    checked_at = models.DateTimeField(null=True, blank=True)
    # Self-hosted: since when jobs have been queued with no live worker (the cold-start clock; cleared by the first
    # heartbeat, which records a ColdStart).
    waiting_since = models.DateTimeField(null=True, blank=True)

    objects = EndpointQuerySet.as_manager()
    grant_policy = GrantPolicy(
        owner_lookup="owners__name",
        creator_field="creator",
        creator_actions=("change", "delete"),
        rules={"view": "visible_to", "change": "changeable_by", "delete": "changeable_by"},
    )

    class Meta:
        indexes = [models.Index(fields=["-start_time", "-id"], name="endpoint_newest")]
        constraints = [
            models.UniqueConstraint(
                fields=["name"], condition=~Q(status=EndpointStatus.DELETED), name="endpoint_live_name"
            )
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def queue_name(self) -> str:
        """Self-hosted: the dramatiq queue of this endpoint's jobs, named as the endpoint (contract §12.2)."""
        return self.name

    @property
    def sagemaker_model_name(self) -> str:
        """``esd-model-{t}-{short}`` for endpoint ``esd-{t}-{short}`` (contract §9.6 step 4)."""
        return "esd-model-" + self.name.removeprefix("esd-")

    @property
    def sagemaker_config_name(self) -> str:
        return "esd-config-" + self.name.removeprefix("esd-")

    @property
    def capacity(self) -> int:
        """Instances this endpoint may use at most (the instance quota counts this)."""
        return max(self.initial_instance_count, self.max_instance_number)


class EndpointOwner(OwnerEntry):
    """One entry of an endpoint's ``owner_group_or_role`` (see ``esd.owners``)."""

    resource = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="owners")

    class Meta(OwnerEntry.Meta):
        pass


class Worker(models.Model):
    """A self-hosted GPU worker as last heard from (its heartbeat on the events queue, every 15 s)."""

    endpoint_name = models.CharField(max_length=63, db_index=True)
    worker = models.CharField(max_length=200)
    instance_type = models.CharField(max_length=100, blank=True, default="")
    last_seen = models.DateTimeField(db_index=True)
    # What the worker's runtime can do (gpu_runtime.protocol.capability_summary), shown on the endpoints page.
    capabilities = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["endpoint_name", "worker"], name="worker_per_endpoint")]

    def __str__(self) -> str:
        return f"{self.worker} @ {self.endpoint_name}"


class ColdStart(models.Model):
    """One scale-from-zero of a self-hosted endpoint: jobs were queued while no worker was live, and a worker's
    first heartbeat came ``seconds`` later. Kept per event (not only the last) so the metrics can export a count
    and a sum, and an operator can see how long an autoscaler takes to bring a GPU worker up."""

    endpoint_name = models.CharField(max_length=63, db_index=True)
    worker = models.CharField(max_length=200)
    queued_at = models.DateTimeField()
    started_at = models.DateTimeField(db_index=True)
    seconds = models.FloatField()

    def __str__(self) -> str:
        return f"{self.endpoint_name}: {self.seconds:.1f} s"


class EndpointUserObjectPermission(UserObjectPermissionBase):
    """A user's object permission on an endpoint (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Endpoint, on_delete=models.CASCADE)


class EndpointGroupObjectPermission(GroupObjectPermissionBase):
    """A role's object permission on an endpoint (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Endpoint, on_delete=models.CASCADE)
