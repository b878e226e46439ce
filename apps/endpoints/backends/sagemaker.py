"""SageMaker endpoints through boto3 (contract §12.1): create, describe, autoscale and tear down.

Every AWS call goes through ``esd.aws.client`` so the same code talks to AWS, or to moto/MinIO when
``AWS_ENDPOINT_URL`` says so. All remote names are deterministic (``endpoint.name``, ``sagemaker_model_name``,
``sagemaker_config_name``, the policy and alarm names below), which is what makes every operation safe to repeat:
a retried provision finds what an earlier attempt made, a repeated ``enable_autoscaling`` replaces its policies, and a
repeated teardown finds nothing left to delete.
"""

from __future__ import annotations

import gzip
import io
import logging
import tarfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from django.conf import settings

from apps.endpoints.backends.base import GONE, BackendError, RemoteStatus
from apps.endpoints.choices import EndpointType
from esd import keys
from esd.aws import client
from esd.storage import blob_store

if TYPE_CHECKING:
    from apps.endpoints.models import Endpoint

logger = logging.getLogger(__name__)

VARIANT = "prod"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
OUTPUT_PREFIX = "sagemaker_output/"
MODEL_DATA_DOWNLOAD_TIMEOUT = 1800
STARTUP_HEALTH_CHECK_TIMEOUT = 600

# Refusals about a request the caller shaped: answered 400 with botocore's own text (contract §5.2).
CALLER_ERRORS = frozenset({"ValidationException", "ResourceLimitExceeded", "ResourceInUse"})

# Autoscaling (contract §12.1; the numbers ESD used).
ASYNC_BACKLOG_TARGET = 3.0
REALTIME_INVOCATIONS_TARGET = 5.0
SCALE_IN_COOLDOWN = 180
SCALE_OUT_COOLDOWN = 60
STEP_COOLDOWN = 180
SCALE_IN_ALARM = {"Period": 900, "EvaluationPeriods": 4, "DatapointsToAlarm": 4}
SCALE_OUT_ALARM = {"Period": 30, "EvaluationPeriods": 1, "DatapointsToAlarm": 1}


def resource_id(endpoint: Endpoint) -> str:
    """The application-autoscaling id of the endpoint's only variant."""
    return f"endpoint/{endpoint.name}/variant/{VARIANT}"


def backlog_alarm_name(endpoint: Endpoint) -> str:
    """The alarm that fires the scale-from-zero step policy (ESD's name, which teardown must also know)."""
    return f"{endpoint.name}-HasBacklogWithoutCapacity-Alarm"


def policy_names(endpoint: Endpoint) -> dict[str, str]:
    """Deterministic scaling-policy names, so ``put_scaling_policy`` replaces instead of adding a second set."""
    return {
        "backlog": f"{endpoint.name}-backlog-target",
        "scale_from_zero": f"{endpoint.name}-scale-from-zero",
        "invocations": f"{endpoint.name}-invocations-target",
    }


def empty_model_archive() -> bytes:
    """A valid, empty ``.tar.gz``: SageMaker insists on a ``ModelDataUrl`` although ESD's container downloads its
    models itself. Built with a fixed gzip timestamp so the bytes never change."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w"):
        pass
    return raw.getvalue()


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _message(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Message", "") or str(exc)


def _sagemaker_not_found(exc: ClientError) -> bool:
    """SageMaker answers a missing model, config or endpoint with ``ValidationException`` "Could not find ..."
    (AWS and moto alike)."""
    return _code(exc) == "ValidationException" and "Could not find" in _message(exc)


def _autoscaling_not_found(exc: ClientError) -> bool:
    """AWS says ``ObjectNotFoundException``; moto 5.2 says ``ValidationException`` "No scalable target found" /
    "No scaling policy found"."""
    if _code(exc) == "ObjectNotFoundException":
        return True
    return _code(exc) == "ValidationException" and "No scal" in _message(exc)


def _exists(describe: Callable[[], Any]) -> bool:
    """Whether a SageMaker ``describe_*`` call finds its resource; any other error propagates."""
    try:
        describe()
    except ClientError as exc:
        if _sagemaker_not_found(exc):
            return False
        raise
    return True


def _tolerate(action: Callable[[], Any], gone: Callable[[ClientError], bool]) -> None:
    """Run a delete, treating "already gone" as done: teardown and rollback must be repeatable."""
    try:
        action()
    except ClientError as exc:
        if not gone(exc):
            raise


class SageMakerBackend:
    """``EndpointBackend`` on SageMaker: one model, one endpoint config and one endpoint per ESD endpoint."""

    name = "sagemaker"

    def configured(self) -> bool:
        """SageMaker needs a role to run as, the two images, and S3 storage (its containers read s3:// URIs)."""
        return bool(
            settings.ESD_SAGEMAKER_ROLE_ARN
            and settings.ESD_SAGEMAKER_INFERENCE_IMAGE
            and settings.ESD_SAGEMAKER_TRAINING_IMAGE
            and settings.ESD_STORAGE == "s3"
        )

    # provision ---------------------------------------------------------------------------------------------------

    def provision(self, endpoint: Endpoint) -> None:
        """Create model → endpoint config → endpoint, skipping whatever an earlier attempt already made.

        A failed step undoes the steps this call went through (config, then model; never an endpoint, which can only
        be someone else's when CreateEndpoint fails), so no half endpoint stays behind. SageMaker refusals about the
        request (``CALLER_ERRORS``) become ``BackendError`` with botocore's text; anything else propagates.
        """
        self._ensure_model_data()
        sagemaker = client("sagemaker")
        reached: list[str] = []
        try:
            if not _exists(lambda: sagemaker.describe_model(ModelName=endpoint.sagemaker_model_name)):
                sagemaker.create_model(**self._model_request(endpoint))
            reached.append("model")
            if not _exists(
                lambda: sagemaker.describe_endpoint_config(EndpointConfigName=endpoint.sagemaker_config_name)
            ):
                sagemaker.create_endpoint_config(**self._config_request(endpoint))
            reached.append("config")
            if not self._endpoint_is_ours(endpoint):
                sagemaker.create_endpoint(EndpointName=endpoint.name, EndpointConfigName=endpoint.sagemaker_config_name)
        except Exception as exc:
            self._roll_back(endpoint, reached)
            if isinstance(exc, ClientError) and _code(exc) in CALLER_ERRORS:
                raise BackendError(str(exc)) from exc
            raise

    def _ensure_model_data(self) -> None:
        """Write the placeholder archive once; every endpoint shares it."""
        store = blob_store()
        if not store.exists(keys.MODEL_DATA):
            store.put_bytes(keys.MODEL_DATA, empty_model_archive())

    def _endpoint_is_ours(self, endpoint: Endpoint) -> bool:
        """An endpoint of this name built on our config is an earlier attempt's: keep it. One on another config is
        not ours, so CreateEndpoint is still called and AWS refuses it ("Cannot create already existing endpoint")."""
        try:
            found = client("sagemaker").describe_endpoint(EndpointName=endpoint.name)
        except ClientError as exc:
            if _sagemaker_not_found(exc):
                return False
            raise
        return found.get("EndpointConfigName") == endpoint.sagemaker_config_name

    def _model_request(self, endpoint: Endpoint) -> dict[str, Any]:
        store = blob_store()
        return {
            "ModelName": endpoint.sagemaker_model_name,
            "PrimaryContainer": {
                "Image": endpoint.custom_docker_image_uri or settings.ESD_SAGEMAKER_INFERENCE_IMAGE,
                "ModelDataUrl": store.uri(keys.MODEL_DATA),
                "Environment": {
                    "BUCKET_NAME": store.bucket,
                    "ENDPOINT_NAME": endpoint.name,
                    "ENDPOINT_ID": str(endpoint.id),
                    "INSTANCE_TYPE": endpoint.instance_type,
                    "EXTENSIONS": endpoint.custom_extensions,
                },
            },
            "ExecutionRoleArn": settings.ESD_SAGEMAKER_ROLE_ARN,
        }

    def _config_request(self, endpoint: Endpoint) -> dict[str, Any]:
        request: dict[str, Any] = {
            "EndpointConfigName": endpoint.sagemaker_config_name,
            "ProductionVariants": [
                {
                    "VariantName": VARIANT,
                    "ModelName": endpoint.sagemaker_model_name,
                    "InitialInstanceCount": endpoint.initial_instance_count,
                    "InstanceType": endpoint.instance_type,
                    "ModelDataDownloadTimeoutInSeconds": MODEL_DATA_DOWNLOAD_TIMEOUT,
                    "ContainerStartupHealthCheckTimeoutInSeconds": STARTUP_HEALTH_CHECK_TIMEOUT,
                }
            ],
        }
        if endpoint.endpoint_type == EndpointType.ASYNC:
            output: dict[str, Any] = {"S3OutputPath": blob_store().uri(OUTPUT_PREFIX)}
            topics = {
                "SuccessTopic": settings.ESD_SAGEMAKER_SUCCESS_TOPIC,
                "ErrorTopic": settings.ESD_SAGEMAKER_ERROR_TOPIC,
            }
            topics = {key: arn for key, arn in topics.items() if arn}
            if topics:
                output["NotificationConfig"] = topics
            request["AsyncInferenceConfig"] = {
                "OutputConfig": output,
                "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 1},
            }
        return request

    def _roll_back(self, endpoint: Endpoint, reached: list[str]) -> None:
        """Undo ``reached`` steps newest first. A rollback error is logged, never raised: the caller must see the
        error that made the provision fail."""
        sagemaker = client("sagemaker")
        undo = {
            "config": lambda: sagemaker.delete_endpoint_config(EndpointConfigName=endpoint.sagemaker_config_name),
            "model": lambda: sagemaker.delete_model(ModelName=endpoint.sagemaker_model_name),
        }
        for step in reversed(reached):
            try:
                _tolerate(undo[step], _sagemaker_not_found)
            except Exception:
                logger.exception("rolling back %s of endpoint %s failed", step, endpoint.name)

    # describe ----------------------------------------------------------------------------------------------------

    def describe(self, endpoint: Endpoint) -> RemoteStatus:
        """SageMaker's ``EndpointStatus`` verbatim (the lifecycle maps it), the running instances and the failure
        reason; an endpoint SageMaker no longer knows is ``GONE``."""
        try:
            found = client("sagemaker").describe_endpoint(EndpointName=endpoint.name)
        except ClientError as exc:
            if _code(exc) == "ValidationException" and "Could not find endpoint" in _message(exc):
                return RemoteStatus(GONE)
            raise
        variants = found.get("ProductionVariants") or [{}]
        return RemoteStatus(
            state=found["EndpointStatus"],
            instances=int(variants[0].get("CurrentInstanceCount") or 0),
            reason=found.get("FailureReason") or "",
        )

    # autoscaling -------------------------------------------------------------------------------------------------

    def enable_autoscaling(self, endpoint: Endpoint) -> None:
        """Register the variant between the endpoint's min and max and attach ESD's policies.

        Async endpoints track the backlog per instance and, because target tracking cannot leave zero instances,
        also get a +1 step policy fired by the ``HasBacklogWithoutCapacity`` alarm. Real-time endpoints track
        invocations per instance. Repeating the call replaces the same policies and alarm.
        """
        scaling = client("application-autoscaling")
        target = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": resource_id(endpoint),
            "ScalableDimension": SCALABLE_DIMENSION,
        }
        scaling.register_scalable_target(
            **target, MinCapacity=endpoint.min_instance_number, MaxCapacity=endpoint.max_instance_number
        )
        names = policy_names(endpoint)
        if endpoint.endpoint_type == EndpointType.ASYNC:
            tracking = scaling.put_scaling_policy(
                **target,
                PolicyName=names["backlog"],
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration={
                    "TargetValue": ASYNC_BACKLOG_TARGET,
                    "CustomizedMetricSpecification": {
                        "MetricName": "ApproximateBacklogSizePerInstance",
                        "Namespace": "AWS/SageMaker",
                        "Dimensions": [{"Name": "EndpointName", "Value": endpoint.name}],
                        "Statistic": "Average",
                    },
                    "ScaleInCooldown": SCALE_IN_COOLDOWN,
                    "ScaleOutCooldown": SCALE_OUT_COOLDOWN,
                },
            )
            retune_alarms(tracking.get("Alarms") or [])
            step = scaling.put_scaling_policy(
                **target,
                PolicyName=names["scale_from_zero"],
                PolicyType="StepScaling",
                StepScalingPolicyConfiguration={
                    "AdjustmentType": "ChangeInCapacity",
                    "MetricAggregationType": "Average",
                    "Cooldown": STEP_COOLDOWN,
                    "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
                },
            )
            client("cloudwatch").put_metric_alarm(
                AlarmName=backlog_alarm_name(endpoint),
                MetricName="HasBacklogWithoutCapacity",
                Namespace="AWS/SageMaker",
                Dimensions=[{"Name": "EndpointName", "Value": endpoint.name}],
                Statistic="Average",
                Period=60,
                EvaluationPeriods=1,
                DatapointsToAlarm=1,
                Threshold=1,
                ComparisonOperator="GreaterThanOrEqualToThreshold",
                TreatMissingData="missing",
                AlarmActions=[step["PolicyARN"]],
            )
        else:
            tracking = scaling.put_scaling_policy(
                **target,
                PolicyName=names["invocations"],
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration={
                    "TargetValue": REALTIME_INVOCATIONS_TARGET,
                    "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
                    "ScaleInCooldown": SCALE_IN_COOLDOWN,
                    "ScaleOutCooldown": SCALE_OUT_COOLDOWN,
                },
            )
            retune_alarms(tracking.get("Alarms") or [])

    # teardown ----------------------------------------------------------------------------------------------------

    def teardown(self, endpoint: Endpoint) -> None:
        """Delete endpoint, scaling policies and target, backlog alarm, endpoint config and model, in that order.

        Each step treats "not found" as done, so a second teardown (or one after a partial provision) is a no-op.
        Other errors stop here and propagate: a caller retrying the whole teardown is safe. Policies are deleted
        explicitly because moto, unlike AWS, keeps them when the target is deregistered.
        """
        sagemaker = client("sagemaker")
        scaling = client("application-autoscaling")
        _tolerate(lambda: sagemaker.delete_endpoint(EndpointName=endpoint.name), _sagemaker_not_found)
        target = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": resource_id(endpoint),
            "ScalableDimension": SCALABLE_DIMENSION,
        }
        policies = scaling.describe_scaling_policies(**target).get("ScalingPolicies", [])
        for policy in policies:
            if policy["ResourceId"] != target["ResourceId"]:
                continue
            _tolerate(
                lambda name=policy["PolicyName"]: scaling.delete_scaling_policy(**target, PolicyName=name),
                _autoscaling_not_found,
            )
        _tolerate(lambda: scaling.deregister_scalable_target(**target), _autoscaling_not_found)
        _tolerate(
            lambda: client("cloudwatch").delete_alarms(AlarmNames=[backlog_alarm_name(endpoint)]),
            lambda exc: _code(exc) == "ResourceNotFound",
        )
        _tolerate(
            lambda: sagemaker.delete_endpoint_config(EndpointConfigName=endpoint.sagemaker_config_name),
            _sagemaker_not_found,
        )
        _tolerate(lambda: sagemaker.delete_model(ModelName=endpoint.sagemaker_model_name), _sagemaker_not_found)


def retune_alarms(alarms: list[dict[str, Any]]) -> None:
    """Rewrite the alarms a target-tracking policy created, as ESD did: scale-in (``AlarmLow``) waits 4 periods of
    900 s so instances are not dropped between bursts, scale-out (``AlarmHigh``) looks at 30 s periods to react fast.

    Everything else of each alarm (metric, threshold, actions) is kept: the alarm is read back and written again
    with only the timing changed. Under moto the list is always empty (it makes no alarms for SageMaker targets).
    """
    cloudwatch = client("cloudwatch")
    accepted = set(cloudwatch.meta.service_model.operation_model("PutMetricAlarm").input_shape.members)
    for alarm in alarms:
        found = cloudwatch.describe_alarms(AlarmNames=[alarm["AlarmName"]]).get("MetricAlarms", [])
        if not found:
            continue
        current = found[0]
        scale_in = "AlarmLow" in current["AlarmName"] or current.get("ComparisonOperator", "").startswith("LessThan")
        timing = SCALE_IN_ALARM if scale_in else SCALE_OUT_ALARM
        request = {key: value for key, value in current.items() if key in accepted}
        request.update({key: value for key, value in timing.items() if key != "Period"})
        if request.get("Metrics"):  # metric math: the period lives in each queried metric
            request.pop("Dimensions", None)
            for query in request["Metrics"]:
                if "MetricStat" in query:
                    query["MetricStat"]["Period"] = timing["Period"]
        else:
            request["Period"] = timing["Period"]
        cloudwatch.put_metric_alarm(**request)


backend = SageMakerBackend()
