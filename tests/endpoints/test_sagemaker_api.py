"""SageMaker endpoints end to end through the API and the monitor, against moto's server."""

import pytest

from apps.endpoints import services
from apps.endpoints.models import Endpoint
from esd.aws import client
from tests.conftest import Api
from tests.endpoints.test_sagemaker_backend import aws, moto_endpoint  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db


def body(**changes):
    return {
        "endpoint_type": "Async",
        "instance_type": "ml.g4dn.xlarge",
        "initial_instance_count": 1,
        "autoscaling_enabled": True,
        "min_instance_number": 0,
        "max_instance_number": 2,
        "assign_to_roles": ["byoc"],
        "creator": "admin",
        "backend": "sagemaker",
        **changes,
    }


def scalable_targets(name: str) -> list:
    return client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=[f"endpoint/{name}/variant/prod"]
    )["ScalableTargets"]


def test_lifecycle_creating_to_in_service_with_autoscaling_once(api: Api, admin_key, aws, settings):  # noqa: F811
    answer = api.post("endpoints", body(endpoint_name="life"), key=admin_key)
    assert answer.status == 202, answer.body
    name = answer.body["data"]["endpoint_name"]
    sm = client("sagemaker")
    assert (
        sm.describe_model(ModelName="esd-model-async-life")["PrimaryContainer"]["Environment"]["ENDPOINT_NAME"] == name
    )
    config = sm.describe_endpoint_config(EndpointConfigName="esd-config-async-life")
    assert (
        config["AsyncInferenceConfig"]["OutputConfig"]["S3OutputPath"]
        == f"s3://{settings.ESD_BUCKET}/sagemaker_output/"
    )
    endpoint = Endpoint.objects.get(name=name)

    moto_endpoint(settings, name).endpoint_status = "Creating"
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert endpoint.status == "Creating" and scalable_targets(name) == []

    moto_endpoint(settings, name).endpoint_status = "InService"
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert (endpoint.status, endpoint.current_instance_count, endpoint.autoscaling_applied) == ("InService", 1, True)
    assert endpoint.end_time is not None
    [target] = scalable_targets(name)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (0, 2)

    # Updating and back: no second autoscaling setup (the operator may have tuned it since).
    client("application-autoscaling").deregister_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=f"endpoint/{name}/variant/prod",
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
    )
    moto_endpoint(settings, name).endpoint_status = "Updating"
    services.reconcile(str(endpoint.pk))
    moto_endpoint(settings, name).endpoint_status = "InService"
    services.reconcile(str(endpoint.pk))
    endpoint.refresh_from_db()
    assert endpoint.status == "InService" and scalable_targets(name) == []

    listed = api.get("endpoints", key=admin_key).body["data"]["endpoints"][0]
    assert (listed["endpoint_status"], listed["current_instance_count"], listed["backend"]) == (
        "InService",
        "1",
        "sagemaker",
    )
    # DELETE tears everything down in the request.
    assert api.delete("endpoints", {"endpoint_name_list": [name]}, key=admin_key).status == 204
    with pytest.raises(client("sagemaker").exceptions.ClientError):
        sm.describe_endpoint(EndpointName=name)
    with pytest.raises(client("sagemaker").exceptions.ClientError):
        sm.describe_model(ModelName="esd-model-async-life")
    assert not Endpoint.objects.exists()


def test_creating_to_failed_records_the_reason(api: Api, admin_key, aws, settings):  # noqa: F811
    name = api.post(
        "endpoints", body(endpoint_name="bad", endpoint_type="Real-time", min_instance_number=1), key=admin_key
    ).body["data"]["endpoint_name"]
    moto_endpoint(settings, name).endpoint_status = "Failed"
    moto_endpoint(settings, name).failure_reason = "CannotStartContainerError"
    endpoint = services.reconcile(str(Endpoint.objects.get(name=name).pk))
    assert (endpoint.status, endpoint.error) == ("Failed", "CannotStartContainerError")
    assert scalable_targets(name) == []
    listed = api.get("endpoints", key=admin_key).body["data"]["endpoints"][0]
    assert (listed["endpoint_status"], listed["error"]) == ("Failed", "CannotStartContainerError")


def test_vanished_endpoint_is_deleted(api: Api, admin_key, aws, settings):  # noqa: F811
    name = api.post("endpoints", body(endpoint_name="gone"), key=admin_key).body["data"]["endpoint_name"]
    client("sagemaker").delete_endpoint(EndpointName=name)
    endpoint = services.reconcile(str(Endpoint.objects.get(name=name).pk))
    assert (endpoint.status, endpoint.current_instance_count) == ("Deleted", 0)
    # a deleted endpoint frees its role and name
    assert api.post("endpoints", body(endpoint_name="gone"), key=admin_key).status == 202


def test_refused_create_is_rolled_back_and_answered_400(api: Api, admin_key, aws):  # noqa: F811
    answer = api.post("endpoints", body(endpoint_name="g5", instance_type="ml.g5.2xlarge"), key=admin_key)
    assert answer.status == 400
    assert answer.body["message"].startswith(
        "An error occurred (ValidationException) when calling the CreateEndpointConfig operation: "
    )
    assert not Endpoint.objects.exists()
    with pytest.raises(client("sagemaker").exceptions.ClientError):
        client("sagemaker").describe_model(ModelName="esd-model-async-g5")
