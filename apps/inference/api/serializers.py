"""Response shapes of ``/inferences`` (contract §9.7): they render the data and document it."""

from rest_framework import serializers

from apps.inference.choices import InferenceStatus
from esd.api.serializers import EsdSerializer, FreeObjectField, StringListField


class InferenceParamsSerializer(EsdSerializer):
    """Where a job's parameters live and where it ran (``params`` of a job)."""

    input_body_s3 = serializers.CharField()
    input_body_presign_url = serializers.CharField()
    sagemaker_inference_endpoint_id = serializers.CharField()
    sagemaker_inference_endpoint_name = serializers.CharField()
    sagemaker_inference_instance_type = serializers.CharField()
    output_path = serializers.CharField(allow_null=True)
    used_models = FreeObjectField(
        required=False, help_text="txt2img/img2img only: {checkpoint type: [the checkpoints the job uses]}"
    )


class InferenceJobSerializer(EsdSerializer):
    """One job as the list shows it."""

    InferenceJobId = serializers.CharField()
    status = serializers.ChoiceField(choices=InferenceStatus.choices)
    taskType = serializers.CharField()
    inference_type = serializers.CharField()
    owner_group_or_role = StringListField()
    createTime = serializers.CharField()
    startTime = serializers.CharField(allow_null=True)
    completeTime = serializers.CharField(allow_null=True)
    image_names = StringListField()
    inference_info_name = serializers.CharField(allow_null=True)
    sagemakerRaw = serializers.JSONField(allow_null=True, help_text="The runtime's failure report")
    payload_string = serializers.CharField(allow_null=True)
    params = InferenceParamsSerializer()


class InferenceProgressSerializer(EsdSerializer):
    """The last step a worker reported (an addition to ESD's job object)."""

    step = serializers.IntegerField(min_value=0)
    total = serializers.IntegerField(
        min_value=0, help_text="Model calls of the whole job (hires fix included); 0 until a worker reports a step"
    )
    eta_seconds = serializers.FloatField(
        allow_null=True, min_value=0, help_text="Time left from the step rate so far; null until two steps are known"
    )


class InferenceJobDetailSerializer(InferenceJobSerializer):
    """One job with presigned URLs of its images and of its result parameters; ``progress`` and
    ``queue_position`` are additions to ESD's shape (ESD clients ignore them)."""

    img_presigned_urls = StringListField()
    output_presigned_urls = StringListField()
    progress = InferenceProgressSerializer()
    gpu_seconds = serializers.FloatField(
        allow_null=True, help_text="Not in ESD: the job's GPU time (its share of a batched call); null until it ends"
    )
    queue_position = serializers.IntegerField(
        allow_null=True,
        min_value=0,
        help_text="Self-hosted jobs no worker has taken yet: jobs of the endpoint queued ahead (0: next); else null",
    )


class InferenceJobListSerializer(EsdSerializer):
    inferences = InferenceJobSerializer(many=True)
    last_evaluated_key = serializers.CharField(allow_null=True, help_text="exclusive_start_key of the next page")


class InferenceModelSerializer(EsdSerializer):
    """A checkpoint a created txt2img/img2img job uses (VAE entries are left out)."""

    id = serializers.CharField()
    name = StringListField()
    type = serializers.CharField()


class CreatedInferenceSerializer(EsdSerializer):
    class CreatedInferenceJob(EsdSerializer):
        id = serializers.CharField()
        type = serializers.CharField()
        api_params_s3_location = serializers.CharField()
        api_params_s3_upload_url = serializers.CharField()
        models = InferenceModelSerializer(many=True, required=False, help_text="txt2img/img2img only")

    inference = CreatedInferenceJob()


class StartedInferenceSerializer(EsdSerializer):
    class StartedInferenceJob(EsdSerializer):
        inference_id = serializers.CharField()
        status = serializers.CharField()
        endpoint_name = serializers.CharField()
        output_path = serializers.CharField(allow_null=True)

    inference = StartedInferenceJob()
