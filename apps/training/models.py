"""Training data: datasets of images and captions in the blob store (training jobs join them later)."""

from __future__ import annotations

from django.db import models
from django.db.models import QuerySet
from django.utils import timezone
from guardian.models import GroupObjectPermissionBase, UserObjectPermissionBase

from apps.accounts.grants import GrantPolicy, granted
from apps.accounts.models import Role, User
from apps.training.choices import DatasetStatus, TrainingStatus
from esd import keys
from esd.owners import OwnerEntry


class DatasetQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> DatasetQuerySet:
        """Contract §4.2: owners share a role with the caller or name them; unowned rows only for ``user:all``."""
        if "user:all" in permissions:
            return self.all()
        return self.filter(granted(Dataset, "view", user, Role.objects.held_by(user).values("pk")))


class Dataset(models.Model):
    """A named folder of training files, ``dataset/{name}[/{prefix}]/`` (kohya's ``<repeats>_<name>`` prefix)."""

    name = models.CharField(max_length=20, unique=True)
    status = models.CharField(max_length=16, choices=DatasetStatus.choices, default=DatasetStatus.INITIALED)
    prefix = models.CharField(max_length=255, blank=True, default="")
    params = models.JSONField(default=dict, blank=True)
    creator = models.CharField(max_length=150)
    created = models.DateTimeField(default=timezone.now)

    objects = DatasetQuerySet.as_manager()
    # Whoever may see a dataset may also change or delete it (train:all on top, contract §4.1).
    grant_policy = GrantPolicy(owner_lookup="owners__name", owner_actions=("view", "change", "delete"))

    class Meta:
        indexes = [models.Index(fields=["-created", "-id"], name="dataset_newest")]

    def __str__(self) -> str:
        return self.name

    @property
    def folder(self) -> str:
        """Where the files are: ``dataset/{name}`` or ``dataset/{name}/{prefix}``."""
        return keys.dataset_prefix(self.name, self.prefix)

    def file_key(self, filename: str) -> str:
        return keys.dataset_file(self.name, filename, self.prefix)


class DatasetItem(models.Model):
    """One uploaded file of a dataset (an image or its caption)."""

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="items")
    key = models.CharField(max_length=300, help_text="ESD's sort key: {timestamp}_{name}")
    name = models.CharField(max_length=255)
    filename = models.CharField(max_length=255, help_text="The uploaded file's name (original_file_name)")
    type = models.CharField(max_length=100)
    params = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=DatasetStatus.choices, default=DatasetStatus.INITIALED)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["dataset", "filename"], name="dataset_item_file")]

    def __str__(self) -> str:
        return self.filename


class DatasetOwner(OwnerEntry):
    """One entry of a dataset's ``allowed_roles_or_users`` (see ``esd.owners``)."""

    resource = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="owners")

    class Meta(OwnerEntry.Meta):
        pass


class TrainingJobQuerySet(QuerySet):
    def visible_to(self, user: User, permissions: frozenset[str]) -> TrainingJobQuerySet:
        """Contract §4.2: owners ([creator]) share a role with the caller or name them; ``user:all`` sees all."""
        if "user:all" in permissions:
            return self.all()
        return self.filter(granted(TrainingJob, "view", user, Role.objects.held_by(user).values("pk")))


class TrainingJob(models.Model):
    """A LoRA training (contract §9.8, §10.5). Its output checkpoint has the same id.

    ``params`` is what the API returns (training_type, training_params, config_params); ``progress`` the last
    epoch/step/loss a worker reported, ``losses`` a bounded history of (step, loss) for the console's chart, and
    ``log`` the notes a run produced (ignored kohya keys, warnings). ``saved`` lists what the runs uploaded while
    they went (epoch files, states, sample images), so a failed or stopped job keeps its states for a resume.
    """

    id = models.UUIDField(primary_key=True, editable=False)
    status = models.CharField(max_length=32, default=TrainingStatus.INITIAL)
    owner = models.CharField(max_length=150, db_index=True)
    backend = models.CharField(max_length=16)
    params = models.JSONField(default=dict)
    created = models.DateTimeField(default=timezone.now)
    finished = models.DateTimeField(null=True, blank=True)
    sagemaker_name = models.CharField(max_length=63, null=True, blank=True)
    reason = models.TextField(blank=True, default="", help_text="Why it failed (params.resp)")
    progress = models.JSONField(default=dict, blank=True)
    losses = models.JSONField(default=list, blank=True)
    log = models.JSONField(default=list, blank=True)
    output_files = models.JSONField(default=list, blank=True)
    attempt = models.PositiveSmallIntegerField(
        default=1, help_text="Runs so far: a resume runs the job again; events of an earlier run are ignored"
    )
    saved = models.JSONField(
        default=list,
        blank=True,
        help_text="Files the runs uploaded as they went: {name, kind (model/state/sample), epoch, step, attempt, key}",
    )
    inputs = models.JSONField(
        default=dict,
        blank=True,
        help_text="Further inputs the config names: {reg_dataset: name, files: {path under inputs/: storage key}}",
    )
    # GPU-seconds accounting (apps.endpoints.usage): what each run trained, by attempt, so a redelivered end event
    # of a run counts once and a resumed job's runs add up; ``gpu_seconds`` is their sum (None: no run reported).
    gpu_seconds = models.FloatField(null=True, blank=True, help_text="GPU-seconds its runs trained, all attempts")
    gpu_seconds_by_attempt = models.JSONField(
        default=dict, blank=True, help_text="{attempt: seconds} as each run's end event (or SageMaker) reported"
    )

    objects = TrainingJobQuerySet.as_manager()
    grant_policy = GrantPolicy(owner_lookup="owner", owner_actions=("view", "change", "delete"))

    class Meta:
        indexes = [
            models.Index(fields=["-created", "-id"], name="training_newest"),
            models.Index(fields=["finished"], name="training_finished"),
        ]

    def __str__(self) -> str:
        return f"training {self.id} ({self.status})"

    @property
    def output_name(self) -> str:
        return self.params["config_params"]["saving_arguments"]["output_name"]


class DatasetUserObjectPermission(UserObjectPermissionBase):
    """A user's object permission on a dataset (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Dataset, on_delete=models.CASCADE)


class DatasetGroupObjectPermission(GroupObjectPermissionBase):
    """A role's object permission on a dataset (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(Dataset, on_delete=models.CASCADE)


class TrainingJobUserObjectPermission(UserObjectPermissionBase):
    """A user's object permission on a training job (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(TrainingJob, on_delete=models.CASCADE)


class TrainingJobGroupObjectPermission(GroupObjectPermissionBase):
    """A role's object permission on a training job (django-guardian, direct foreign key for indexed joins)."""

    content_object = models.ForeignKey(TrainingJob, on_delete=models.CASCADE)
