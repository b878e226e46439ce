"""Contract §1-2: envelope, headers, CORS, preflight, 404/405 before authentication, body limit, 500s."""

import re

import pytest
from django.test import override_settings

from tests.conftest import Api

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

pytestmark = pytest.mark.django_db


def assert_esd_headers(answer) -> None:
    headers = answer.headers
    assert headers["x-api-version"] == "1.5.0"
    assert UUID.match(headers["x-request-id"])
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Access-Control-Allow-Methods"] == "GET,POST,PUT,DELETE,OPTIONS"
    assert headers["Access-Control-Allow-Headers"] == (
        "Content-Type, X-Amz-Date, Authorization, X-Api-Key, X-Amz-Security-Token, X-Amz-User-Agent, username"
    )
    assert headers["Access-Control-Allow-Credentials"] == "true"


def test_ping_is_byte_compatible(api: Api, admin_key: str):
    answer = api.get("ping", key=admin_key)
    assert answer.status == 200
    assert answer.raw == b'{"statusCode":200,"message":"pong"}'
    assert answer.headers["Content-Type"] == "application/json"
    assert_esd_headers(answer)


def test_trailing_slash_is_served_directly(api: Api, admin_key: str):
    answer = api.get("ping/", key=admin_key)
    assert answer.status == 200
    assert answer.body == {"statusCode": 200, "message": "pong"}


def test_missing_key_is_bare_forbidden_with_headers(api: Api):
    answer = api.get("ping")
    assert answer.status == 403
    assert answer.raw == b'{"message":"Forbidden"}'
    assert_esd_headers(answer)


def test_options_preflight_needs_no_key_on_any_path(api: Api):
    for path in ("users", "no/such/route", "checkpoints/123"):
        answer = api.call("OPTIONS", path)
        assert answer.status == 204
        assert answer.raw == b""
        assert "Content-Type" not in answer.headers
        assert_esd_headers(answer)


def test_unknown_path_is_404_before_authentication(api: Api):
    answer = api.get("no/such/route")
    assert answer.status == 404
    assert answer.raw == b'{"statusCode":404,"message":"Not Found"}'
    assert_esd_headers(answer)


def test_known_path_other_method_is_405_before_authentication(api: Api):
    answer = api.put("users", {})
    assert answer.status == 405
    assert answer.body == {"statusCode": 405, "message": "Method Not Allowed"}
    assert set(answer.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST", "DELETE"}
    assert_esd_headers(answer)


def test_body_over_limit_is_413(api: Api, admin_key: str, settings):
    answer = api.post("roles", raw_body=b"x" * (settings.ESD_MAX_BODY_BYTES + 1), key=admin_key)
    assert answer.status == 413
    assert answer.body == {"statusCode": 413, "message": "Request Entity Too Large"}
    assert_esd_headers(answer)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[1,2]", b'"text"', b"42", b'{"role_name": NaN}', b'{"a": "\\u0000"}', b'{"a": "\\ud800"}'],
)
def test_body_that_is_not_a_json_object(api: Api, admin_key: str, raw: bytes):
    answer = api.post("roles", raw_body=raw, key=admin_key)
    assert answer.status == 400
    assert answer.body == {
        "statusCode": 400,
        "message": "[Invalid request body]",
        "errors": {"body": ["Invalid request body"]},
    }


def test_deeply_nested_body_is_a_400_not_a_crash(api: Api, admin_key: str):
    answer = api.post("roles", raw_body=b"[" * 100_000 + b"]" * 100_000, key=admin_key)
    assert answer.status == 400


def test_content_type_is_not_checked(api: Api, admin_key: str):
    response = api.client.generic(
        "POST",
        "/api/roles",
        b'{"role_name":"r1","permissions":["train:all"]}',
        content_type="text/plain",
        headers={"x-api-key": admin_key},
    )
    assert response.status_code == 201


def test_empty_body_counts_as_empty_object(api: Api, admin_key: str):
    answer = api.post("roles", raw_body=b"", key=admin_key)
    assert answer.status == 400
    assert answer.body["message"] == '[object has missing required properties (["permissions","role_name"])]'


def test_unexpected_properties_after_schema_passes(api: Api, admin_key: str):
    answer = api.post("roles", {"role_name": "x", "permissions": ["train:all"], "zeta": 1, "alpha": 2}, key=admin_key)
    assert answer.status == 400
    assert answer.body == {
        "statusCode": 400,
        "message": 'unexpected properties: ["alpha","zeta"]',
        "errors": {"alpha": ["unexpected property"], "zeta": ["unexpected property"]},
    }


def test_validation_comes_before_the_acting_user(api: Api, service_key: str):
    # A service key without a user would be 401, but the body is checked first (contract §3.3).
    answer = api.post("users", {}, key=service_key)
    assert answer.status == 400


@override_settings(ROOT_URLCONF="tests.esd.urls_crash")
def test_invalid_key_never_reaches_the_view(api: Api):
    answer = api.get("crash", key="not-a-key")
    assert answer.status == 403
    assert answer.body == {"message": "Forbidden"}


@override_settings(ROOT_URLCONF="tests.esd.urls_crash")
def test_bug_in_a_view_gives_500_envelope(api: Api, admin_key: str, caplog):
    answer = api.get("crash", key=admin_key)
    assert answer.status == 500
    assert answer.body == {
        "statusCode": 500,
        "message": "Internal Server Error",
        "requestId": answer.headers["x-request-id"],
    }
    assert b"secret" not in answer.raw
    assert answer.headers["x-request-id"] in caplog.text
    assert "secret internal detail" in caplog.text


@override_settings(ROOT_URLCONF="tests.esd.urls_crash")
def test_bug_outside_drf_still_gets_the_envelope(api: Api):
    answer = api.get("plain-crash")
    assert answer.status == 500
    assert answer.body["requestId"] == answer.headers["x-request-id"]
    assert_esd_headers(answer)


def test_accept_header_does_not_change_the_format(api: Api, admin_key: str):
    answer = api.get("ping", key=admin_key, headers={"Accept": "text/html"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"


def test_paths_outside_the_prefix_have_no_api_headers(api: Api):
    response = api.client.get("/admin/login/")
    assert response.status_code == 200
    assert "x-api-version" not in response.headers
