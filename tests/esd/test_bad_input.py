"""Issue 13: bad input is a 4xx in the ESD shape (or S3's XML on a signed URL), never a 500 or Django's HTML.
Each test replays what the attack run sent."""

import json
import re

import pytest
import requests

from apps.accounts.models import Role
from apps.models_registry.models import Checkpoint
from tests.conftest import Api

pytestmark = pytest.mark.django_db


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


def _body_routes() -> list[tuple[str, str]]:
    """Every operation of the OpenAPI document that takes a JSON body, with a concrete path."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    routes = []
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                concrete = re.sub(r"\{[^}]+\}", "00000000-0000-0000-0000-000000000000", path)
                routes.append((method.upper(), concrete))
    return routes


@pytest.mark.parametrize("levels", [318, 950, 20_000])
def test_deeply_nested_json_is_a_400_on_every_body_route(api: Api, admin_key, levels):
    routes = _body_routes()
    assert len(routes) >= 10
    for method, path in routes:
        raw = ('{"a": ' + deep(levels) + "}").encode()
        answer = api.call(method, path, raw_body=raw, key=admin_key)
        assert answer.status == 400, (method, path, answer.status, answer.raw[:200])
        assert answer.body["statusCode"] == 400 and answer.body["message"]


def test_deep_payload_string_is_the_contracts_400(api: Api, admin_key, disk_store):
    from tests.inference.test_inference_api import endpoint

    endpoint("esd-async-a")
    for levels in (318, 950, 100_000):
        body = {
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": {"Stable-diffusion": ["x.safetensors"]},
            "payload_string": '{"prompt": ' + deep(levels) + "}",
        }
        answer = api.post("inferences", body, key=admin_key)
        assert answer.body == {"statusCode": 400, "message": "payload_string must be valid json string"}, levels


def test_file_names_over_255_bytes_are_refused_at_registration(api: Api, admin_key, disk_store):
    long = "图" * 100 + ".safetensors"  # 112 characters, 312 bytes
    body = {"checkpoint_type": "Stable-diffusion", "params": {}, "filenames": [{"filename": long, "parts_number": 1}]}
    assert api.post("checkpoints", body, key=admin_key).body == {
        "statusCode": 400,
        "message": f"filename {long} is not allowed",
    }
    dataset = {"dataset_name": "lego", "content": [{"filename": long, "name": long, "type": "image", "params": {}}]}
    assert api.post("datasets", {**dataset, "params": {}}, key=admin_key).body["statusCode"] == 400
    assert not Checkpoint.objects.exists()


def test_bidirectional_controls_are_refused_like_other_control_characters(api: Api, admin_key, disk_store):
    tricky = "gnp.\u202eexe.safetensors"
    body = {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": tricky, "parts_number": 1}]}
    assert api.post("checkpoints", body, key=admin_key).status == 400
    for name in ("ops\u2066", "\u202bops", "a\x85b"):
        answer = api.post("roles", {"role_name": name, "permissions": ["train:list"]}, key=admin_key)
        assert answer.status == 400 and "control character" in answer.body["message"]
    assert not Role.objects.filter(name__startswith="ops").exists()


def test_integers_beyond_the_databases_range_are_a_400(api: Api, admin_key):
    from tests.endpoints.test_endpoints_api import body

    for field in ("min_instance_number", "max_instance_number", "initial_instance_count"):
        raw = json.dumps(body(endpoint_name="big")).replace("}", f', "{field}": 9223372036854775808}}', 1)
        answer = api.call("POST", "endpoints", raw_body=raw.encode(), key=admin_key)
        assert answer.status == 400 and answer.body["statusCode"] == 400, (field, answer.raw[:200])


def test_a_bad_host_header_gets_the_json_envelope_under_the_api(client, settings):
    from esd.api.middleware import BLOB_PREFIX

    response = client.get("/" + settings.ESD_API_PREFIX + "ping", HTTP_HOST="evil.example")
    assert response.status_code == 400 and response["Content-Type"] == "application/json"
    assert json.loads(response.content) == {"statusCode": 400, "message": "Invalid Host header"}
    blob = client.get(BLOB_PREFIX + "a/b", HTTP_HOST="evil.example")
    assert blob.status_code == 400 and blob["Content-Type"] == "application/xml" and b"<Code>" in blob.content


def test_the_signed_url_view_answers_s3_xml_for_an_overlong_key(local_store):
    url = local_store.presign_put("dataset/lego/" + "a" * 300, 60)
    answer = requests.put(url, data=b"x", timeout=30)
    assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/xml"
    assert "<Code>KeyTooLongError</Code>" in answer.text
