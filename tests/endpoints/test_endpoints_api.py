"""Contract §9.6: the three endpoint routes with the self-hosted backend (SageMaker ones: test_sagemaker_api)."""

import re

import dramatiq
import pytest

from apps.endpoints.models import Endpoint
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db


def body(**changes):
    return {
        "endpoint_type": "Async",
        "instance_type": "ml.g5.2xlarge",
        "initial_instance_count": 1,
        "autoscaling_enabled": False,
        "assign_to_roles": ["byoc"],
        "creator": "admin",
        **changes,
    }


def test_create_answers_202_with_the_endpoint(api: Api, admin_key):
    answer = api.post("endpoints", body(endpoint_name="test"), key=admin_key)
    assert answer.status == 202, answer.body
    assert answer.body["message"] == "Endpoint deployment started: esd-async-test"
    data = answer.body["data"]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$", data.pop("startTime"))
    endpoint_id = data.pop("EndpointDeploymentJobId")
    assert data == {
        "autoscaling": False,
        "max_instance_number": "1",
        "min_instance_number": "0",
        "endTime": None,
        "status": None,
        "instance_type": "ml.g5.2xlarge",
        "current_instance_count": "0",
        "endpoint_status": "Creating",
        "endpoint_name": "esd-async-test",
        "error": None,
        "endpoint_type": "Async",
        "owner_group_or_role": ["byoc"],
        "custom_extensions": "",
        "backend": "self-hosted",
    }
    assert Endpoint.objects.get(pk=endpoint_id).creator == "admin"
    assert "esd-async-test" in dramatiq.get_broker().queues  # the self-hosted queue is declared


def test_generated_short_name_and_real_time(api: Api, admin_key):
    data = api.post("endpoints", body(endpoint_type="Real-time", endpoint_name=""), key=admin_key).body["data"]
    assert data["endpoint_name"] == f"esd-real-time-{data['EndpointDeploymentJobId'][:7]}"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"custom_extensions": "a/b", "custom_docker_image_uri": "img", "endpoint_type": "Serverless"},
            "custom_extensions and custom_docker_image_uri cannot be used together",
        ),
        ({"endpoint_type": "Serverless"}, "Serverless endpoint is not supported yet"),
        ({"backend": "sagemaker"}, "backend sagemaker is not configured"),
        ({"custom_docker_image_uri": "img"}, "custom_docker_image_uri is not supported by self-hosted endpoints"),
        (
            {"endpoint_type": "Real-time", "autoscaling_enabled": True, "min_instance_number": 0, "endpoint_name": "x"},
            "min_instance_number should be at least 1 for real-time endpoint: x",
        ),
        (
            {"endpoint_type": "Real-time", "autoscaling_enabled": True, "min_instance_number": 0},
            "min_instance_number should be at least 1 for real-time endpoint: ",
        ),
        (
            {"autoscaling_enabled": True, "min_instance_number": 3, "max_instance_number": 2, "endpoint_name": "x"},
            "max_instance_number should be at least min_instance_number: esd-async-x",
        ),
        ({"custom_extensions": "a, b c\nd a"}, "custom_extensions should be at most 3"),
        ({"initial_instance_count": 1.5}, "initial_instance_count must be a whole number"),
        ({"max_instance_number": 2.5}, "max_instance_number must be a whole number"),
    ],
)
def test_create_rules_in_order(api: Api, admin_key, changes, message):
    answer = api.post("endpoints", body(**changes), key=admin_key)
    assert answer.body == {"statusCode": 400, "message": message}
    assert not Endpoint.objects.exists()


@pytest.mark.parametrize(
    ("changes", "errors"),
    [
        (
            {"initial_instance_count": "1"},
            {
                "initial_instance_count": [
                    'instance type (string) does not match any allowed primitive type (allowed: ["integer","number"])'
                ]
            },
        ),
        (
            {"initial_instance_count": 0},
            {"initial_instance_count": ["numeric instance is lower than the required minimum (minimum: 1, found: 0)"]},
        ),
        (
            {"endpoint_name": "bad_name"},
            {
                "endpoint_name": [
                    'ECMA 262 regex "^[a-zA-Z0-9](-*[a-zA-Z0-9])*$" does not match input string "bad_name"'
                ]
            },
        ),
        (
            {"endpoint_name": "x" * 21},
            {"endpoint_name": [f'string "{"x" * 21}" is too long (length: 21, allowed maximum: 20)']},
        ),
        (
            {"assign_to_roles": []},
            {"assign_to_roles": ["array is too short: must have at least 1 elements but instance has 0 elements"]},
        ),
        (
            {"endpoint_type": "Batch"},
            {
                "endpoint_type": [
                    'instance value ("Batch") not found in enum (possible values: ["Real-time","Serverless","Async"])'
                ]
            },
        ),
    ],
)
def test_create_validation(api: Api, admin_key, changes, errors):
    answer = api.post("endpoints", body(**changes), key=admin_key)
    assert answer.status == 400 and answer.body["errors"] == errors


def test_extensions_are_normalised(api: Api, admin_key):
    data = api.post("endpoints", body(custom_extensions="a/x, b/y\na/x"), key=admin_key).body["data"]
    assert data["custom_extensions"] == "a/x,b/y"


def test_one_live_endpoint_per_role(api: Api, admin_key, settings):
    assert api.post("endpoints", body(assign_to_roles=["byoc"]), key=admin_key).status == 202
    answer = api.post("endpoints", body(assign_to_roles=["Other", "byoc"]), key=admin_key)
    assert answer.body == {
        "statusCode": 400,
        "message": "role [byoc] has a valid endpoint already, not allow to have another one",
    }
    Endpoint.objects.update(status="Failed")  # a failed endpoint still counts
    assert api.post("endpoints", body(assign_to_roles=["byoc"]), key=admin_key).status == 400
    Endpoint.objects.update(status="Deleted")  # a deleted one does not
    assert api.post("endpoints", body(assign_to_roles=["byoc"]), key=admin_key).status == 202
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    assert api.post("endpoints", body(assign_to_roles=["byoc"]), key=admin_key).status == 202


def test_name_in_use(api: Api, admin_key, settings):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    api.post("endpoints", body(endpoint_name="dup"), key=admin_key)
    answer = api.post("endpoints", body(endpoint_name="dup"), key=admin_key)
    assert answer.body == {
        "statusCode": 400,
        "message": 'Cannot create already existing model "esd-model-async-dup": endpoint esd-async-dup already exists',
    }


def test_instance_quota(api: Api, admin_key, settings):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    settings.ESD_INSTANCE_QUOTAS = "ml.g5.2xlarge=3,*=16"
    assert api.post("endpoints", body(initial_instance_count=2), key=admin_key).status == 202
    answer = api.post("endpoints", body(autoscaling_enabled=True, max_instance_number=2), key=admin_key)
    assert answer.body == {
        "statusCode": 400,
        "message": (
            "An error occurred (ResourceLimitExceeded) when calling the CreateEndpoint operation: The account-level "
            "service limit 'ml.g5.2xlarge for endpoint usage' is 3 Instances, with current utilization of 2 Instances "
            "and a request delta of 2 Instances. Please use AWS Service Quotas to request an increase for this quota."
        ),
    }
    assert api.post("endpoints", body(instance_type="cpu"), key=admin_key).status == 202  # "*" applies


class TestVisibilityAndPermissions:
    @pytest.fixture
    def keys(self, db, settings):
        settings.ESD_ONE_ENDPOINT_PER_ROLE = False
        make_role("Deployers", ["sagemaker_endpoint:create", "sagemaker_endpoint:list"])
        make_role("Watchers", ["sagemaker_endpoint:list"])
        return {
            "deployer": make_key(make_user("deployer", roles=("Deployers",))),
            "watcher": make_key(make_user("watcher", roles=("Watchers",))),
        }

    def test_matrix(self, api: Api, admin_key, keys, outsider_key):
        mine = api.post("endpoints", body(assign_to_roles=["Deployers"], endpoint_name="mine"), key=keys["deployer"])
        assert mine.status == 202
        api.post("endpoints", body(assign_to_roles=["byoc"], endpoint_name="ops"), key=admin_key)
        names = lambda key: [e["endpoint_name"] for e in api.get("endpoints", key=key).body["data"]["endpoints"]]  # noqa: E731
        assert names(keys["deployer"]) == ["esd-async-mine"]
        assert names(keys["watcher"]) == []
        assert names(admin_key) == ["esd-async-ops", "esd-async-mine"]
        denied = api.post("endpoints", body(), key=keys["watcher"])
        assert denied.body == {
            "statusCode": 403,
            "message": "User watcher has no permissions: ['sagemaker_endpoint:all', 'sagemaker_endpoint:create']",
        }
        assert api.get("endpoints", key=outsider_key).body["message"] == (
            "User outsider has no permissions: ['sagemaker_endpoint:all', 'sagemaker_endpoint:list']"
        )
        # deleting needs :all or being the creator; invisible names are skipped
        assert api.delete("endpoints", {"endpoint_name_list": ["esd-async-ops"]}, key=keys["deployer"]).status == 204
        assert Endpoint.objects.filter(name="esd-async-ops").exists()
        assert api.delete("endpoints", {"endpoint_name_list": ["esd-async-mine"]}, key=keys["deployer"]).status == 204
        assert not Endpoint.objects.filter(name="esd-async-mine").exists()

    def test_filters_and_pages(self, api: Api, admin_key, keys):
        for i in range(3):
            api.post("endpoints", body(endpoint_name=f"e{i}", assign_to_roles=["Deployers"]), key=admin_key)
        first = api.get("endpoints", key=admin_key, params={"limit": 2}).body["data"]
        assert [e["endpoint_name"] for e in first["endpoints"]] == ["esd-async-e2", "esd-async-e1"]
        rest = api.get(
            "endpoints", key=admin_key, params={"limit": 2, "exclusive_start_key": first["last_evaluated_key"]}
        ).body["data"]
        assert [e["endpoint_name"] for e in rest["endpoints"]] == ["esd-async-e0"] and rest[
            "last_evaluated_key"
        ] is None
        one = first["endpoints"][0]["EndpointDeploymentJobId"]
        only = api.get("endpoints", key=admin_key, params={"endpointDeploymentJobId": one}).body["data"]["endpoints"]
        assert [e["EndpointDeploymentJobId"] for e in only] == [one]
        assert (
            api.get("endpoints", key=admin_key, params={"endpointDeploymentJobId": "junk"}).body["data"]["endpoints"]
            == []
        )
        assert len(api.get("endpoints", key=admin_key, params={"username": "deployer"}).body["data"]["endpoints"]) == 3
        assert api.get("endpoints", key=admin_key, params={"username": "watcher"}).body["data"]["endpoints"] == []
        assert api.get("endpoints", key=admin_key, params={"username": "ghost"}).body == {
            "statusCode": 400,
            "message": 'user: "ghost" not exist',
        }


def test_delete_with_a_service_key_and_no_user(api: Api, admin_key, service_key):
    api.post("endpoints", body(endpoint_name="gone"), key=admin_key)
    answer = api.delete(
        "endpoints", {"endpoint_name_list": ["esd-async-gone", "unknown"], "username": "x"}, key=service_key
    )
    assert answer.status == 204
    assert not Endpoint.objects.exists()


def test_delete_sends_the_removal_signal(api: Api, admin_key):
    from apps.endpoints.services import endpoint_removed

    seen = []

    def receiver(sender, endpoint, **kwargs):
        seen.append(endpoint.name)

    endpoint_removed.connect(receiver)
    try:
        api.post("endpoints", body(endpoint_name="sig"), key=admin_key)
        api.delete("endpoints", {"endpoint_name_list": ["esd-async-sig"]}, key=admin_key)
    finally:
        endpoint_removed.disconnect(receiver)
    assert seen == ["esd-async-sig"]
