"""Response shapes of ``/datasets`` and ``/trainings`` (contract §9.5, §9.8): they render the data and document it."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from django.conf import settings
from drf_spectacular.extensions import OpenApiSerializerExtension, OpenApiSerializerFieldExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.training.api.schemas import STATUSES
from apps.training.models import Dataset, DatasetItem, TrainingJob
from esd import keys
from esd.api.formats import epoch_string
from esd.api.serializers import EsdSerializer
from esd.storage import blob_store

NOT_APPLIED = "not_applied"
TRAIN_TYPE = "Stable-diffusion"


class EpochField(serializers.CharField):
    """A time as epoch seconds with six decimals, a string (contract §1: ``created``, ``timestamp``)."""

    def to_representation(self, value: datetime) -> str:
        return epoch_string(value)


class DatasetStatusField(serializers.CharField):
    """A dataset's or a file's status (``status``, ``dataStatus``): one choice set, one enum component."""


class DatasetStatusScheme(OpenApiSerializerFieldExtension):
    """Documents ``DatasetStatusField`` as a reference to one ``DatasetStatusEnum``: inline enums would be named
    after each key by drf-spectacular, which warns when one choice set gets two names."""

    target_class = DatasetStatusField

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        component = ResolvedComponent(
            name="DatasetStatusEnum",
            type=ResolvedComponent.SCHEMA,
            object="DatasetStatusEnum",
            schema={"type": "string", "enum": STATUSES},
        )
        auto_schema.registry.register_on_missing(component)
        return component.ref


class ParamsMergedSerializer(EsdSerializer):
    """A row whose free ``params`` (the client's keys) are merged into the object itself, as ESD does.

    The declared fields win over the params (contract §9.5) and keep the params' place when they share a key.
    ``leading`` names declared fields written before the params, which therefore can replace them (ESD's detail
    view spreads the params after ``dataset_name`` and ``prefix``).
    """

    leading: ClassVar[tuple[str, ...]] = ()

    def to_representation(self, instance: Any) -> dict[str, Any]:
        fixed = super().to_representation(instance)
        leading = {name: fixed.pop(name) for name in self.leading}
        return {**leading, **instance.params, **fixed}


class ParamsMergedScheme(OpenApiSerializerExtension):
    """Documents a ``ParamsMergedSerializer`` as open: the params add keys of the client's choosing."""

    target_class = ParamsMergedSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        return {**auto_schema._map_basic_serializer(self.target, direction), "additionalProperties": True}


# --- datasets (contract §9.5) -------------------------------------------------------------------------------------


class DatasetSerializer(ParamsMergedSerializer):
    """A dataset as listed: its params, with the fixed keys over them."""

    datasetName = serializers.CharField(source="name")
    s3 = serializers.SerializerMethodField()
    status = DatasetStatusField()
    timestamp = EpochField(source="created")

    def get_s3(self, dataset: Dataset) -> str:
        return blob_store().uri(dataset.folder)


class DatasetListSerializer(EsdSerializer):
    datasets = DatasetSerializer(many=True)
    last_evaluated_key = serializers.CharField(allow_null=True, help_text="null on the last page")


class DatasetFileSerializer(ParamsMergedSerializer):
    """One file of a dataset: its params, with the fixed keys over them."""

    key = serializers.CharField()
    name = serializers.CharField()
    type = serializers.CharField()
    preview_url = serializers.SerializerMethodField()
    dataStatus = DatasetStatusField(source="status")
    original_file_name = serializers.CharField(source="filename")

    def get_preview_url(self, item: DatasetItem) -> str:
        """A presigned GET of the file (``item.dataset`` is the listed dataset: no query)."""
        return blob_store().presign_get(item.dataset.file_key(item.filename), settings.ESD_DATASET_PREVIEW_EXPIRES)


class DatasetDetailSerializer(DatasetSerializer):
    """A dataset with its files; the params may replace ``dataset_name`` and ``prefix`` (ESD's order)."""

    leading = ("dataset_name", "prefix")

    dataset_name = serializers.CharField(source="name")
    prefix = serializers.CharField(allow_blank=True)
    data = DatasetFileSerializer(source="items", many=True)


class DatasetCreatedSerializer(EsdSerializer):
    datasetName = serializers.CharField()
    s3PresignUrl = serializers.DictField(child=serializers.CharField(), help_text="A presigned PUT URL per file name")


class DatasetStatusSerializer(EsdSerializer):
    datasetName = serializers.CharField(source="name")
    status = DatasetStatusField()


# --- trainings (contract §9.8) ------------------------------------------------------------------------------------


class TrainingParamsField(serializers.DictField):
    """A job's ``params`` as stored, with its failure reason as ``resp`` when it has one (read from the job)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(source="*", help_text="training_type, training_params, config_params (and resp)", **kwargs)

    def to_representation(self, job: TrainingJob) -> dict[str, Any]:
        params = dict(job.params)
        if job.reason:
            params["resp"] = job.reason
        return params


class TrainingSerializer(EsdSerializer):
    id = serializers.UUIDField()
    modelName = serializers.SerializerMethodField()
    status = serializers.CharField()
    trainType = serializers.SerializerMethodField()
    created = EpochField()
    sagemakerTrainName = serializers.CharField(source="sagemaker_name", allow_null=True)
    params = TrainingParamsField()

    def get_modelName(self, job: TrainingJob) -> str:
        return job.params.get("training_params", {}).get("model_name") or NOT_APPLIED

    def get_trainType(self, job: TrainingJob) -> str:
        return TRAIN_TYPE


class TrainingListSerializer(EsdSerializer):
    trainings = TrainingSerializer(many=True)
    last_evaluated_key = serializers.CharField(allow_null=True, help_text="null on the last page")


class TrainingCreatedSerializer(EsdSerializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    created = EpochField()
    params = TrainingParamsField()
    input_location = serializers.SerializerMethodField()
    output_location = serializers.SerializerMethodField()

    def get_input_location(self, job: TrainingJob) -> str:
        return blob_store().uri(keys.training_input(str(job.id)))

    def get_output_location(self, job: TrainingJob) -> str:
        return blob_store().uri(keys.training_output(str(job.id)))


class TrainingProgressSerializer(EsdSerializer):
    """The last step a worker reported, with an estimate of the time left (an addition to ESD's shape)."""

    epoch = serializers.IntegerField(required=False)
    epochs = serializers.IntegerField(required=False)
    step = serializers.IntegerField(required=False)
    steps = serializers.IntegerField(required=False)
    loss = serializers.FloatField(required=False)
    eta_seconds = serializers.FloatField(required=False, help_text="From the step rate so far")

    def to_representation(self, progress: dict[str, Any]) -> dict[str, Any]:
        return {name: progress[name] for name in self.fields if isinstance(progress.get(name), int | float)}


class TrainingSampleSerializer(EsdSerializer):
    """One sample image a run made (kohya's ``sample_prompts``), with a presigned GET."""

    name = serializers.CharField(help_text="The trainer's file name (kohya's, without the timestamp)")
    epoch = serializers.IntegerField(allow_null=True)
    step = serializers.IntegerField(allow_null=True)
    attempt = serializers.IntegerField(help_text="The run that made it (a resume is the next run)")
    url = serializers.SerializerMethodField()

    def get_url(self, entry: dict[str, Any]) -> str:
        return blob_store().presign_get(entry["key"], settings.ESD_PRESIGN_EXPIRES)


class TrainingStateSerializer(EsdSerializer):
    """A saved training state (``save_state``): what a resume continues from."""

    name = serializers.CharField()
    epoch = serializers.IntegerField(allow_null=True)
    step = serializers.IntegerField(allow_null=True)


class TrainingDetailSerializer(EsdSerializer):
    id = serializers.UUIDField()
    checkpoint_id = serializers.UUIDField(source="id", help_text="The output checkpoint has the job's id")
    job_status = serializers.CharField(source="status")
    model_id = serializers.SerializerMethodField()
    params = TrainingParamsField()
    timestamp = EpochField(source="created")
    train_type = serializers.SerializerMethodField()
    progress = TrainingProgressSerializer(help_text="Not in ESD: step, loss and ETA while the job runs")
    samples = serializers.SerializerMethodField(help_text="Not in ESD: the sample images made so far")
    states = serializers.SerializerMethodField(help_text="Not in ESD: the saved states a resume can continue from")
    attempt = serializers.IntegerField(help_text="Not in ESD: 1, and one more for each resume")
    gpu_seconds = serializers.FloatField(
        allow_null=True, help_text="Not in ESD: the GPU time of the runs that ended (a resumed job's runs add up)"
    )

    @extend_schema_field(TrainingSampleSerializer(many=True))
    def get_samples(self, job: TrainingJob) -> list[dict[str, Any]]:
        return [TrainingSampleSerializer.render(e) for e in job.saved if e.get("kind") == "sample"]

    @extend_schema_field(TrainingStateSerializer(many=True))
    def get_states(self, job: TrainingJob) -> list[dict[str, Any]]:
        return [TrainingStateSerializer.render(e) for e in job.saved if e.get("kind") == "state"]

    def get_model_id(self, job: TrainingJob) -> str:
        return "kohya"

    def get_train_type(self, job: TrainingJob) -> str:
        return TRAIN_TYPE
