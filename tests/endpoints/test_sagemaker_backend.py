"""The SageMaker backend against moto's server: every call is real HTTP to moto, and every check reads moto's state
back with boto3. Nothing in boto3 is mocked; the one lifecycle change moto cannot make by itself (an endpoint leaving
``InService``) is made by editing moto's in-process backend object, as moto has no endpoint lifecycle.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import uuid

import pytest
import requests
from botocore.exceptions import ClientError, EndpointConnectionError

from apps.endpoints.backends.base import GONE, BackendError, RemoteStatus
from apps.endpoints.backends.sagemaker import (
    SageMakerBackend,
    backend,
    backlog_alarm_name,
    empty_model_archive,
    policy_names,
    resource_id,
    retune_alarms,
)
from apps.endpoints.models import Endpoint
from esd import keys
from esd.aws import client, reset_clients
from esd.storage import _store
from tests.conftest import use_store

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/esd"
IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/esd:latest"
TRAINING_IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/esd-training:latest"
SUCCESS_TOPIC = f"arn:aws:sns:us-east-1:{ACCOUNT}:esd-success"
ERROR_TOPIC = f"arn:aws:sns:us-east-1:{ACCOUNT}:esd-error"
DIMENSION = "sagemaker:variant:DesiredInstanceCount"


@pytest.fixture
def aws(settings, tmp_path, moto_server):
    """A fresh bucket on moto, SageMaker configured, and moto wiped afterwards (the reset drops the bucket too,
    which is why this is per test)."""
    store = use_store(settings, "s3", tmp_path=tmp_path, moto_url=moto_server)
    settings.ESD_SAGEMAKER_ROLE_ARN = ROLE
    settings.ESD_SAGEMAKER_INFERENCE_IMAGE = IMAGE
    settings.ESD_SAGEMAKER_TRAINING_IMAGE = TRAINING_IMAGE
    settings.ESD_SAGEMAKER_SUCCESS_TOPIC = ""
    settings.ESD_SAGEMAKER_ERROR_TOPIC = ""
    yield store
    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    _store.cache_clear()
    reset_clients()


def make_endpoint(name: str = "esd-async-test1", endpoint_type: str = "Async", **fields) -> Endpoint:
    values = {
        "name": name,
        "endpoint_type": endpoint_type,
        "backend": "sagemaker",
        "instance_type": "ml.g4dn.xlarge",
        "initial_instance_count": 1,
        "min_instance_number": 0,
        "max_instance_number": 2,
        "autoscaling": True,
        "creator": "admin",
        **fields,
    }
    return Endpoint(**values)


def sagemaker():
    return client("sagemaker")


def missing(describe) -> bool:
    """Whether a SageMaker describe call reports its resource as not found."""
    try:
        describe()
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "ValidationException"
        assert "Could not find" in exc.response["Error"]["Message"]
        return True
    return False


def nothing_left(ep: Endpoint) -> bool:
    return (
        missing(lambda: sagemaker().describe_endpoint(EndpointName=ep.name))
        and missing(lambda: sagemaker().describe_endpoint_config(EndpointConfigName=ep.sagemaker_config_name))
        and missing(lambda: sagemaker().describe_model(ModelName=ep.sagemaker_model_name))
    )


def moto_endpoint(settings, name: str):
    """moto's own stored endpoint object (in-process server), for the state changes moto never makes itself."""
    from moto.sagemaker import models as smm

    return smm.sagemaker_backends[ACCOUNT][settings.AWS_REGION].endpoints[name]


def policies(ep: Endpoint) -> list[dict]:
    found = client("application-autoscaling").describe_scaling_policies(
        ServiceNamespace="sagemaker", ResourceId=resource_id(ep), ScalableDimension=DIMENSION
    )["ScalingPolicies"]
    return sorted(found, key=lambda p: p["PolicyName"])


def targets(ep: Endpoint) -> list[dict]:
    return client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[resource_id(ep)], ScalableDimension=DIMENSION
    )["ScalableTargets"]


def alarms(name: str) -> list[dict]:
    return client("cloudwatch").describe_alarms(AlarmNames=[name])["MetricAlarms"]


# --- provision -----------------------------------------------------------------------------------------------------


def test_realtime_provision_creates_model_config_and_endpoint(aws):
    ep = make_endpoint("esd-real-time-rt1", "Real-time", initial_instance_count=2, custom_extensions="a,b")
    backend.provision(ep)

    model = sagemaker().describe_model(ModelName="esd-model-real-time-rt1")
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataUrl"] == f"s3://{aws.bucket}/data/model.tar.gz"
    assert container["Environment"] == {
        "BUCKET_NAME": aws.bucket,
        "ENDPOINT_NAME": "esd-real-time-rt1",
        "ENDPOINT_ID": str(ep.id),
        "INSTANCE_TYPE": "ml.g4dn.xlarge",
        "EXTENSIONS": "a,b",
    }

    config = sagemaker().describe_endpoint_config(EndpointConfigName="esd-config-real-time-rt1")
    assert len(config["ProductionVariants"]) == 1
    variant = config["ProductionVariants"][0]
    assert variant["VariantName"] == "prod"
    assert variant["ModelName"] == "esd-model-real-time-rt1"
    assert variant["InitialInstanceCount"] == 2
    assert variant["InstanceType"] == "ml.g4dn.xlarge"
    assert variant["ModelDataDownloadTimeoutInSeconds"] == 1800
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 600
    assert "AsyncInferenceConfig" not in config

    endpoint = sagemaker().describe_endpoint(EndpointName="esd-real-time-rt1")
    assert endpoint["EndpointConfigName"] == "esd-config-real-time-rt1"
    assert endpoint["EndpointStatus"] == "InService"
    assert [e["EndpointName"] for e in sagemaker().list_endpoints()["Endpoints"]] == ["esd-real-time-rt1"]


def test_async_provision_sets_output_path_and_topics(aws, settings):
    settings.ESD_SAGEMAKER_SUCCESS_TOPIC = SUCCESS_TOPIC
    settings.ESD_SAGEMAKER_ERROR_TOPIC = ERROR_TOPIC
    ep = make_endpoint()
    backend.provision(ep)

    config = sagemaker().describe_endpoint_config(EndpointConfigName="esd-config-async-test1")
    assert config["AsyncInferenceConfig"] == {
        "OutputConfig": {
            "S3OutputPath": f"s3://{aws.bucket}/sagemaker_output/",
            "NotificationConfig": {"SuccessTopic": SUCCESS_TOPIC, "ErrorTopic": ERROR_TOPIC},
        },
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 1},
    }
    assert sagemaker().describe_endpoint(EndpointName="esd-async-test1")["EndpointStatus"] == "InService"


def test_async_provision_names_only_the_topics_that_are_set(aws, settings):
    settings.ESD_SAGEMAKER_ERROR_TOPIC = ERROR_TOPIC
    backend.provision(make_endpoint())
    output = sagemaker().describe_endpoint_config(EndpointConfigName="esd-config-async-test1")["AsyncInferenceConfig"][
        "OutputConfig"
    ]
    assert output["NotificationConfig"] == {"ErrorTopic": ERROR_TOPIC}


def test_async_provision_without_topics_has_no_notification_config(aws):
    backend.provision(make_endpoint())
    output = sagemaker().describe_endpoint_config(EndpointConfigName="esd-config-async-test1")["AsyncInferenceConfig"][
        "OutputConfig"
    ]
    assert output == {"S3OutputPath": f"s3://{aws.bucket}/sagemaker_output/"}


def test_placeholder_model_data_is_an_empty_valid_tar_gz_written_once(aws):
    backend.provision(make_endpoint())
    data = aws.read_bytes(keys.MODEL_DATA)
    assert data == empty_model_archive()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        assert archive.getmembers() == []
    assert gzip.decompress(data)  # a real gzip stream (an empty tar is 10 KiB of zeros)

    aws.put_bytes(keys.MODEL_DATA, b"kept")  # an existing archive is never rewritten
    backend.provision(make_endpoint("esd-async-test2"))
    assert aws.read_bytes(keys.MODEL_DATA) == b"kept"


def test_custom_image_is_used(aws):
    custom = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/custom:1"
    backend.provision(make_endpoint(custom_docker_image_uri=custom))
    assert sagemaker().describe_model(ModelName="esd-model-async-test1")["PrimaryContainer"]["Image"] == custom


def test_provisioning_twice_is_harmless(aws):
    ep = make_endpoint()
    backend.provision(ep)
    first = (
        sagemaker().describe_model(ModelName=ep.sagemaker_model_name)["CreationTime"],
        sagemaker().describe_endpoint_config(EndpointConfigName=ep.sagemaker_config_name)["CreationTime"],
        sagemaker().describe_endpoint(EndpointName=ep.name)["CreationTime"],
    )
    backend.provision(ep)
    again = (
        sagemaker().describe_model(ModelName=ep.sagemaker_model_name)["CreationTime"],
        sagemaker().describe_endpoint_config(EndpointConfigName=ep.sagemaker_config_name)["CreationTime"],
        sagemaker().describe_endpoint(EndpointName=ep.name)["CreationTime"],
    )
    assert again == first  # nothing was recreated
    assert len(sagemaker().list_models()["Models"]) == 1
    assert len(sagemaker().list_endpoint_configs()["EndpointConfigs"]) == 1
    assert len(sagemaker().list_endpoints()["Endpoints"]) == 1


def test_retry_after_a_partial_attempt_completes_the_endpoint(aws):
    ep = make_endpoint()
    backend.provision(ep)
    sagemaker().delete_endpoint(EndpointName=ep.name)  # as if the first attempt died before CreateEndpoint
    backend.provision(ep)
    assert sagemaker().describe_endpoint(EndpointName=ep.name)["EndpointConfigName"] == ep.sagemaker_config_name


# --- provision failures ----------------------------------------------------------------------------------------------


def test_refused_endpoint_config_rolls_back_the_model(aws):
    ep = make_endpoint(instance_type="ml.g5.2xlarge")  # moto refuses g5 in endpoint configs
    with pytest.raises(BackendError) as raised:
        backend.provision(ep)
    message = raised.value.message
    assert message.startswith(
        "An error occurred (ValidationException) when calling the CreateEndpointConfig operation: "
    )
    assert "ml.g5.2xlarge" in message
    assert str(raised.value) == message
    assert nothing_left(ep)


def test_refused_endpoint_rolls_back_config_and_model(aws, moto_server, settings):
    """moto's CreateEndpoint fails only when the config it names does not exist, so the config is deleted (through
    moto's own API, from a second client) right before our CreateEndpoint is sent: botocore's ``before-call`` event
    fires after our CreateEndpointConfig succeeded. moto then refuses for real, as AWS does for a config deleted
    underneath (or for a name taken by another endpoint, which moto instead silently overwrites)."""
    import boto3

    ep = make_endpoint()
    other = boto3.client("sagemaker", endpoint_url=moto_server, region_name=settings.AWS_REGION)

    def delete_config(**_):
        other.delete_endpoint_config(EndpointConfigName=ep.sagemaker_config_name)

    events = client("sagemaker").meta.events
    events.register("before-call.sagemaker.CreateEndpoint", delete_config, unique_id="esd-test-delete-config")
    try:
        with pytest.raises(BackendError) as raised:
            backend.provision(ep)
    finally:
        events.unregister("before-call.sagemaker.CreateEndpoint", unique_id="esd-test-delete-config")

    assert raised.value.message == (
        "An error occurred (ValidationException) when calling the CreateEndpoint operation: "
        f"Could not find endpoint configuration 'arn:aws:sagemaker:{settings.AWS_REGION}:{ACCOUNT}:"
        f"endpoint-config/{ep.sagemaker_config_name}'."
    )
    assert nothing_left(ep)


def test_unexpected_error_rolls_back_and_propagates(aws):
    """A network failure is not the caller's fault: it propagates unchanged (a 500), after the same rollback."""
    ep = make_endpoint()

    def unreachable(**_):
        raise EndpointConnectionError(endpoint_url="https://api.sagemaker.example")

    events = client("sagemaker").meta.events
    events.register("before-call.sagemaker.CreateEndpoint", unreachable, unique_id="esd-test-unreachable")
    try:
        with pytest.raises(EndpointConnectionError):
            backend.provision(ep)
    finally:
        events.unregister("before-call.sagemaker.CreateEndpoint", unique_id="esd-test-unreachable")
    assert nothing_left(ep)


# --- describe --------------------------------------------------------------------------------------------------------


def test_describe_reports_in_service_with_instances(aws):
    ep = make_endpoint("esd-real-time-rt2", "Real-time", initial_instance_count=2)
    backend.provision(ep)
    assert backend.describe(ep) == RemoteStatus("InService", 2, "")


def test_describe_reports_creating_and_failed(aws, settings):
    ep = make_endpoint()
    backend.provision(ep)
    stored = moto_endpoint(settings, ep.name)

    stored.endpoint_status = "Creating"
    assert backend.describe(ep) == RemoteStatus("Creating", 1, "")

    stored.endpoint_status, stored.failure_reason = "Failed", "CannotStartContainerError"
    assert backend.describe(ep) == RemoteStatus("Failed", 1, "CannotStartContainerError")


def test_describe_counts_zero_without_current_instances(aws, settings):
    ep = make_endpoint()
    backend.provision(ep)
    moto_endpoint(settings, ep.name).production_variants = [{"VariantName": "prod"}]
    assert backend.describe(ep).instances == 0


def test_describe_of_a_deleted_endpoint_is_gone(aws):
    ep = make_endpoint()
    backend.provision(ep)
    sagemaker().delete_endpoint(EndpointName=ep.name)
    assert backend.describe(ep) == RemoteStatus(GONE)
    assert backend.describe(make_endpoint("esd-async-never")) == RemoteStatus(GONE)


# --- autoscaling -----------------------------------------------------------------------------------------------------


def test_async_autoscaling_scales_on_backlog_and_from_zero(aws):
    ep = make_endpoint(min_instance_number=0, max_instance_number=2)
    backend.provision(ep)
    backend.enable_autoscaling(ep)
    backend.enable_autoscaling(ep)  # a repeat replaces, never duplicates

    [target] = targets(ep)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)

    names = policy_names(ep)
    tracking, step = policies(ep)
    assert tracking["PolicyName"] == names["backlog"]
    assert tracking["PolicyType"] == "TargetTrackingScaling"
    config = tracking["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == 3
    assert config["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": ep.name}],
        "Statistic": "Average",
    }
    assert step["PolicyName"] == names["scale_from_zero"]
    assert step["PolicyType"] == "StepScaling"
    step_config = step["StepScalingPolicyConfiguration"]
    assert step_config["AdjustmentType"] == "ChangeInCapacity"
    assert step_config["StepAdjustments"] == [{"MetricIntervalLowerBound": 0.0, "ScalingAdjustment": 1}]
    assert step_config["Cooldown"] > 0

    [alarm] = alarms(backlog_alarm_name(ep))
    assert alarm["AlarmName"] == "esd-async-test1-HasBacklogWithoutCapacity-Alarm"
    assert alarm["AlarmActions"] == [step["PolicyARN"]]
    assert (alarm["MetricName"], alarm["Namespace"], alarm["Statistic"]) == (
        "HasBacklogWithoutCapacity",
        "AWS/SageMaker",
        "Average",
    )
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": ep.name}]
    assert (alarm["Threshold"], alarm["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
    assert alarm["Period"] == 60
    assert len(client("cloudwatch").describe_alarms()["MetricAlarms"]) == 1


def test_realtime_autoscaling_tracks_invocations(aws):
    ep = make_endpoint("esd-real-time-rt3", "Real-time", min_instance_number=1, max_instance_number=3)
    backend.provision(ep)
    backend.enable_autoscaling(ep)
    backend.enable_autoscaling(ep)

    [target] = targets(ep)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    [policy] = policies(ep)
    assert policy["PolicyName"] == policy_names(ep)["invocations"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert config["TargetValue"] == 5
    assert config["PredefinedMetricSpecification"] == {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}
    assert client("cloudwatch").describe_alarms()["MetricAlarms"] == []


def test_target_tracking_alarms_are_retuned_keeping_the_rest(aws):
    """moto returns no alarms for SageMaker target tracking, so the alarms AWS would create are made here and the
    rewrite runs on them: scale-in 4 periods of 900 s, scale-out 30 s, metric, threshold and actions untouched."""
    cloudwatch = client("cloudwatch")
    action = f"arn:aws:autoscaling:us-east-1:{ACCOUNT}:scalingPolicy:{uuid.uuid4()}:resource/sagemaker/x"
    common = {
        "MetricName": "ApproximateBacklogSizePerInstance",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": "esd-async-x"}],
        "Statistic": "Average",
        "AlarmActions": [action],
        "AlarmDescription": "DO NOT EDIT OR DELETE. For TargetTrackingScaling policy",
    }
    low, high = "TargetTracking-endpoint/esd-async-x/variant/prod-AlarmLow-1", "TargetTracking-x-AlarmHigh-2"
    cloudwatch.put_metric_alarm(
        AlarmName=low,
        Period=60,
        EvaluationPeriods=15,
        DatapointsToAlarm=15,
        Threshold=2.7,
        ComparisonOperator="LessThanThreshold",
        **common,
    )
    cloudwatch.put_metric_alarm(
        AlarmName=high,
        Period=60,
        EvaluationPeriods=3,
        DatapointsToAlarm=3,
        Threshold=3,
        ComparisonOperator="GreaterThanThreshold",
        **common,
    )

    retune_alarms([{"AlarmName": low, "AlarmARN": "x"}, {"AlarmName": high, "AlarmARN": "y"}])

    [scale_in] = alarms(low)
    assert (scale_in["Period"], scale_in["EvaluationPeriods"], scale_in["DatapointsToAlarm"]) == (900, 4, 4)
    assert (scale_in["Threshold"], scale_in["ComparisonOperator"]) == (2.7, "LessThanThreshold")
    [scale_out] = alarms(high)
    assert (scale_out["Period"], scale_out["EvaluationPeriods"], scale_out["DatapointsToAlarm"]) == (30, 1, 1)
    assert (scale_out["Threshold"], scale_out["ComparisonOperator"]) == (3, "GreaterThanThreshold")
    for alarm in (scale_in, scale_out):
        assert alarm["AlarmActions"] == [action]
        assert alarm["AlarmDescription"] == common["AlarmDescription"]
        assert (alarm["MetricName"], alarm["Namespace"], alarm["Statistic"]) == (
            common["MetricName"],
            "AWS/SageMaker",
            "Average",
        )
        assert alarm["Dimensions"] == common["Dimensions"]


# --- teardown --------------------------------------------------------------------------------------------------------


def test_teardown_leaves_nothing_and_repeats_quietly(aws):
    ep = make_endpoint()
    backend.provision(ep)
    backend.enable_autoscaling(ep)
    assert targets(ep) and policies(ep) and alarms(backlog_alarm_name(ep))

    backend.teardown(ep)

    assert nothing_left(ep)
    assert targets(ep) == []
    assert policies(ep) == []
    assert alarms(backlog_alarm_name(ep)) == []
    backend.teardown(ep)  # everything already gone: no error


def test_teardown_of_something_never_made_does_not_raise(aws):
    backend.teardown(make_endpoint("esd-real-time-none", "Real-time"))


def test_teardown_keeps_other_endpoints(aws):
    keep, drop = make_endpoint("esd-async-keep"), make_endpoint("esd-async-drop")
    for ep in (keep, drop):
        backend.provision(ep)
        backend.enable_autoscaling(ep)
    backend.teardown(drop)
    assert backend.describe(keep).state == "InService"
    assert len(policies(keep)) == 2 and targets(keep) and alarms(backlog_alarm_name(keep))


# --- configuration ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cleared",
    [None, "ESD_SAGEMAKER_ROLE_ARN", "ESD_SAGEMAKER_INFERENCE_IMAGE", "ESD_SAGEMAKER_TRAINING_IMAGE", "ESD_STORAGE"],
)
def test_configured_needs_role_both_images_and_s3(settings, cleared):
    settings.ESD_SAGEMAKER_ROLE_ARN = ROLE
    settings.ESD_SAGEMAKER_INFERENCE_IMAGE = IMAGE
    settings.ESD_SAGEMAKER_TRAINING_IMAGE = TRAINING_IMAGE
    settings.ESD_STORAGE = "s3"
    if cleared:
        setattr(settings, cleared, "local" if cleared == "ESD_STORAGE" else "")
    assert SageMakerBackend().configured() is (cleared is None)
    assert backend.name == "sagemaker"
