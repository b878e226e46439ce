"""Checkpoints: model files (Stable Diffusion, LoRA, VAE, ...) in the blob store, with owners and a status."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import QuerySet
from django.utils import timezone
from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

from apps.accounts.grants import GrantPolicy, granted
from apps.accounts.models import Role, User
from apps.models_registry.choices import CheckpointStatus, CheckpointType
from esd.owners import OwnerEntry, owned_by


class CheckpointQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> CheckpointQuerySet:
        """Contract §4.2: ``user:all`` sees all; others see unowned checkpoints, ``*``, their own name, or a role
        they hold or created."""
        if "user:all" in permissions:
            return self.all()
        roles = Role.objects.held_or_created_by(user).values("pk")
        return self.filter(granted(Checkpoint, "view", user, roles) | self._public())

    def usable_by(self, user: User) -> CheckpointQuerySet:
        """The ``?username=`` filter: unowned, ``*``, the user's name, or a role the user holds."""
        roles = Role.objects.held_by(user).values("pk")
        return self.filter(granted(Checkpoint, "view", user, roles) | self._public())

    @staticmethod
    def _public() -> models.Q:
        """Owners empty or ``*``: everyone may use the checkpoint (a rule of the names, not a grant)."""
        return owned_by(CheckpointOwner, ["*"], unowned=True)

    def changeable_by(self, user: User, permissions: frozenset[str]) -> CheckpointQuerySet:
        """Changing or deleting needs ``checkpoint:all`` or being the creator (contract §4.2), on top of
        visibility."""
        visible = self.visible_to(user, permissions)
        return visible if "checkpoint:all" in permissions else visible.filter(granted(Checkpoint, "change", user, None))

    def active(self) -> CheckpointQuerySet:
        return self.filter(status=CheckpointStatus.ACTIVE)


class Checkpoint(models.Model):
    """One registered model: one or more files under ``prefix`` in the blob store.

    ``uploads`` tracks the multipart uploads a client still has to complete ({filename: {upload_id, key, done}});
    ``source_url`` and the byte counters track a download by URL; ``error`` says why one failed.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    checkpoint_type = models.CharField(max_length=32, choices=CheckpointType.choices)
    status = models.CharField(max_length=16, choices=CheckpointStatus.choices, default=CheckpointStatus.INITIAL)
    prefix = models.CharField(max_length=512, help_text="Storage folder of the files")
    params = models.JSONField(default=dict, blank=True, help_text="The client's params")
    creator = models.CharField(max_length=150, db_index=True)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(auto_now=True)
    uploads = models.JSONField(default=dict, blank=True)
    source_url = models.TextField(blank=True, default="")
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    objects = CheckpointQuerySet.as_manager()
    grant_policy = GrantPolicy(
        owner_lookup="owners__name",
        empty_is_public=True,
        creator_field="creator",
        creator_actions=("change", "delete"),
        rules={"view": "visible_to", "change": "changeable_by", "delete": "changeable_by"},
    )

    class Meta:
        indexes = [
            models.Index(fields=["-created", "-id"], name="checkpoint_newest"),
            models.Index(fields=["checkpoint_type", "status"], name="checkpoint_type_status"),
        ]

    def __str__(self) -> str:
        names = [f.name for f in self.files.all()]
        return f"{self.checkpoint_type}: {', '.join(names) or self.id}"

    @property
    def open_uploads(self) -> dict[str, dict]:
        return {name: info for name, info in self.uploads.items() if not info.get("done")}


class CheckpointFile(models.Model):
    """A file name of a checkpoint. Unique across all checkpoints: inference and training refer to models by it."""

    checkpoint = models.ForeignKey(Checkpoint, on_delete=models.CASCADE, related_name="files")
    position = models.PositiveSmallIntegerField()
    name = models.CharField(max_length=255, unique=True)

    class Meta:
        ordering = ["position"]
        constraints = [
            models.UniqueConstraint(fields=["checkpoint", "position"], name="checkpoint_file_position"),
        ]

    def __str__(self) -> str:
        return self.name


class CheckpointOwner(OwnerEntry):
    """One entry of a checkpoint's ``allowed_roles_or_users`` (see ``esd.owners``)."""

    resource = models.ForeignKey(Checkpoint, on_delete=models.CASCADE, related_name="owners")

    class Meta(OwnerEntry.Meta):
        pass


class CheckpointUserObjectPermission(UserObjectPermissionBase):
    """A user's object permission on a checkpoint (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Checkpoint, on_delete=models.CASCADE)


class CheckpointGroupObjectPermission(GroupObjectPermissionBase):
    """A role's object permission on a checkpoint (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Checkpoint, on_delete=models.CASCADE)
