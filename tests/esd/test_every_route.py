"""Every route of the router, times every kind of credential, against the contract's tables (§3.1, §3.3, §4.1).

The routes come from the URL resolver (whatever the router serves is tested); the expectations come from the
contract, written out below, not from the viewsets' own declarations. Each request carries a body that passes the
route's schema (built from the schema itself), so the acting-user and permission steps are really reached.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from django.urls import get_resolver

from apps.accounts.choices import ApiKeyKind
from apps.training.api.schemas import NATIVE_PARAMS
from esd.api.validation import validate_body
from tests.conftest import Api, make_key, make_user

pytestmark = pytest.mark.django_db

# Contract §4.1: any one of these permissions lets the acting user through (None: only a valid key).
PERMISSIONS: dict[tuple[str, str], list[str] | None] = {
    ("GET", "ping"): None,
    ("GET", "roles"): ["role:all", "role:list"],
    ("POST", "roles"): ["role:all", "role:create"],
    ("DELETE", "roles"): ["role:all"],
    ("GET", "users"): ["user:all", "user:list"],
    ("POST", "users"): ["user:all"],
    ("DELETE", "users"): ["user:all"],
    ("GET", "checkpoints"): ["checkpoint:all", "checkpoint:list"],
    ("POST", "checkpoints"): ["checkpoint:all", "checkpoint:create"],
    ("PUT", "checkpoints/{id}"): ["checkpoint:all", "checkpoint:create"],
    ("DELETE", "checkpoints"): ["checkpoint:all", "checkpoint:create"],
    ("GET", "datasets"): ["train:all"],
    ("POST", "datasets"): ["train:all"],
    ("DELETE", "datasets"): ["train:all"],
    ("GET", "datasets/{name}"): ["train:all"],
    ("PUT", "datasets/{name}"): ["train:all"],
    ("GET", "trainings"): ["train:all"],
    ("POST", "trainings"): ["train:all"],
    ("DELETE", "trainings"): ["train:all"],
    ("GET", "trainings/{id}"): ["train:all"],
    ("GET", "endpoints"): ["sagemaker_endpoint:all", "sagemaker_endpoint:list"],
    ("POST", "endpoints"): ["sagemaker_endpoint:all", "sagemaker_endpoint:create"],
    ("DELETE", "endpoints"): ["sagemaker_endpoint:all", "sagemaker_endpoint:create"],
    ("GET", "inferences"): ["inference:all", "inference:list", "inference:create"],
    ("GET", "inferences/{id}"): ["inference:all", "inference:list", "inference:create"],
    ("POST", "inferences"): ["inference:all", "inference:create"],
    ("PUT", "inferences/{id}/start"): ["inference:all", "inference:create"],
    ("DELETE", "inferences"): ["inference:all", "inference:create"],
}
# Routes beyond ESD (additions: no ESD client calls them, none of ESD's routes changed), with the permissions of
# the contract's §4.1 rules for the route they act like: cancelling a job is starting or deleting it.
BEYOND_ESD: dict[tuple[str, str], list[str] | None] = {
    ("PUT", "inferences/{id}/cancel"): ["inference:all", "inference:create"],
}
CONTRACT_ROUTES = dict(PERMISSIONS)
PERMISSIONS = {**CONTRACT_ROUTES, **BEYOND_ESD}
# Contract §3.1: routes ESD served without a user, where a service key naming nobody acts as its own user.
KEYLESS = {
    ("PUT", "checkpoints/{id}"),
    ("GET", "inferences"),
    ("GET", "inferences/{id}"),
    ("DELETE", "roles"),
    ("DELETE", "checkpoints"),
    ("DELETE", "datasets"),
    ("DELETE", "endpoints"),
    ("DELETE", "inferences"),
}
NEEDS_NO_USER = {("GET", "ping")}


def routed() -> list[tuple[str, str, Any]]:
    """(method, path template, handler) for every action the API's router serves."""
    found = []

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
                continue
            viewset = getattr(pattern.callback, "cls", None)
            if getattr(pattern.callback, "actions", None) is None or not prefix.startswith("api/"):
                continue
            template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", str(pattern.pattern)).strip("^$").replace("/?", "")
            for method, action in pattern.callback.actions.items():
                if method != "head":
                    found.append((method.upper(), template, getattr(viewset, action)))

    walk(get_resolver().url_patterns, "")
    return found


ROUTES = routed()


def test_the_router_serves_exactly_the_contracts_routes():
    """Every route of the contract, and besides them only the additions listed above: no ESD route is lost or
    reshaped, and no route appears that this test does not check."""
    served = sorted((method, path) for method, path, _ in ROUTES)
    assert served == sorted(PERMISSIONS)
    assert set(CONTRACT_ROUTES) <= set(served) and not set(CONTRACT_ROUTES) & set(BEYOND_ESD)


def minimal(schema: dict) -> Any:
    """The smallest value a schema accepts (required fields only), so a request passes validation."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal(props.get(name, {"type": "string"})) for name in schema.get("required", [])}
    if kind == "array":
        return [minimal(schema.get("items", {"type": "string"})) for _ in range(schema.get("minItems", 0))]
    if kind in ("integer", "number"):
        return schema.get("minimum", 1)
    if kind == "boolean":
        return False
    return "x" * max(1, schema.get("minLength", 1))


def request(api: Api, method: str, template: str, handler: Any, **kw: Any):
    path = "/api/" + template.replace("{id}", str(uuid.uuid4())).replace("{name}", "nosuchset")
    body = handler.operation.body
    data = None
    if body is not None:
        data = minimal(body)
        validate_body(body, data)  # the generated body is valid: later steps are reached
        if (method, template) == ("POST", "trainings"):  # its params have a schema of their own (§9.8)
            data["params"] = minimal(NATIVE_PARAMS)
    return api.call(method, path, data, **kw)


IDS = [f"{m} {p}" for m, p, _ in ROUTES]


@pytest.mark.parametrize(("method", "template", "handler"), ROUTES, ids=IDS)
def test_no_key_and_a_bad_key_are_refused_first(api: Api, method, template, handler):
    for headers in ({}, {"key": "x" * 40}):
        answer = request(api, method, template, handler, **headers)
        assert (answer.status, answer.body) == (403, {"message": "Forbidden"})


@pytest.mark.parametrize(("method", "template", "handler"), ROUTES, ids=IDS)
def test_service_key_without_a_user(api: Api, admin, method, template, handler):
    answer = request(api, method, template, handler, key=make_key(admin, ApiKeyKind.SERVICE))
    if (method, template) in NEEDS_NO_USER | KEYLESS:
        assert answer.status not in (401, 403), answer.body  # acts as the key's own user (an IT Operator)
    else:
        assert (answer.status, answer.body) == (401, {"statusCode": 401, "message": "Unauthorized"})
    unknown = request(api, method, template, handler, key=make_key(admin, ApiKeyKind.SERVICE), username="nobody")
    if (method, template) not in NEEDS_NO_USER:
        assert (unknown.status, unknown.body) == (401, {"statusCode": 401, "message": "Unauthorized"})


@pytest.mark.parametrize(("method", "template", "handler"), ROUTES, ids=IDS)
def test_personal_key_naming_another_user(api: Api, admin, designer, method, template, handler):
    answer = request(api, method, template, handler, key=make_key(admin), username="designer")
    if (method, template) in NEEDS_NO_USER:
        assert answer.status == 200
    else:
        message = "API key does not belong to user designer"
        assert (answer.status, answer.body) == (403, {"statusCode": 403, "message": message})


@pytest.mark.parametrize(("method", "template", "handler"), ROUTES, ids=IDS)
def test_no_permission(api: Api, method, template, handler):
    nobody = make_user("roleless")
    answer = request(api, method, template, handler, key=make_key(nobody))
    wanted = PERMISSIONS[(method, template)]
    if wanted is None:
        assert answer.status == 200
    else:
        message = f"User roleless has no permissions: {wanted!r}"
        assert (answer.status, answer.body) == (403, {"statusCode": 403, "message": message})


@pytest.mark.parametrize(("method", "template", "handler"), ROUTES, ids=IDS)
def test_permitted(api: Api, admin, method, template, handler):
    """An IT Operator passes every check; what follows is the route's own logic (a documented status, which the
    Api helper checks against the published schema), never 401/403 or a 500."""
    for wanted in ({"key": make_key(admin)}, {"key": make_key(admin, ApiKeyKind.SERVICE), "username": "admin"}):
        answer = request(api, method, template, handler, **wanted)
        assert answer.status not in (401, 403) and answer.status < 500, (answer.status, answer.body)
        if "{" in template and method == "GET":
            assert answer.status == 404 and "not found" in answer.body["message"]
