"""Contract §9.9: the OpenAPI document is valid, complete and served offline with Swagger UI."""

import json
import re

import pytest
from django.core.management import call_command

from tests.conftest import Api

pytestmark = pytest.mark.django_db

ROUTES = {
    "/api/ping/": {"get": "TestConnection"},
    "/api/roles/": {"get": "ListRoles", "post": "CreateRole", "delete": "DeleteRoles"},
    "/api/users/": {"get": "ListUsers", "post": "CreateUser", "delete": "DeleteUsers"},
    "/api/checkpoints/": {"get": "ListCheckpoints", "post": "CreateCheckpoint", "delete": "DeleteCheckpoints"},
    "/api/checkpoints/{id}/": {"put": "UpdateCheckpoint"},
    "/api/datasets/": {"get": "ListDatasets", "post": "CreateDataset", "delete": "DeleteDatasets"},
    "/api/datasets/{name}/": {"get": "GetDataset", "put": "UpdateDataset"},
}


def test_spectacular_validates_without_warnings(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert "openapi: 3" in out.read_text()


def inline_refs(node, components):
    """The document with every ``$ref`` to a component replaced by the component (responses are serializers)."""
    if isinstance(node, list):
        return [inline_refs(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return inline_refs(components[node["$ref"].rsplit("/", 1)[1]], components)
    return {key: inline_refs(value, components) for key, value in node.items()}


def test_schema_documents_every_route_with_real_shapes(api: Api):
    response = api.client.get("/api/schema/?format=json")
    assert response.status_code == 200
    raw = json.loads(response.content)
    schema = {**raw, "paths": inline_refs(raw["paths"], raw["components"]["schemas"])}
    for path, operations in ROUTES.items():
        for method, operation_id in operations.items():
            assert schema["paths"][path][method]["operationId"] == operation_id
    delete_roles = schema["paths"]["/api/roles/"]["delete"]["requestBody"]["content"]["application/json"]["schema"]
    assert delete_roles["required"] == ["role_name_list"]
    create_user = schema["paths"]["/api/users/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert create_user["properties"]["username"]["pattern"] == r"^[\w.@+-]+$"
    users_200 = schema["paths"]["/api/users/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(users_200["properties"]["data"]["properties"]["users"]["items"]["properties"]) == {
        "username",
        "roles",
        "creator",
        "permissions",
        "password",
    }
    assert schema["components"]["securitySchemes"]["ApiKeyAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "x-api-key",
        "description": schema["components"]["securitySchemes"]["ApiKeyAuth"]["description"],
    }


def test_schema_is_yaml_by_default(api: Api):
    response = api.client.get("/api/schema/")
    assert response.status_code == 200
    assert response.content.startswith(b"openapi: 3")


def test_swagger_ui_is_served_from_our_own_static_files(api: Api):
    response = api.client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger-ui" in html
    external = [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if u.startswith(("http:", "https:", "//"))]
    assert external == []
    bundle = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', html).group(1)
    assert api.client.get(bundle).status_code == 200


def test_docs_can_require_a_key(api: Api, settings, admin_key):
    settings.ESD_API_DOCS_PUBLIC = False
    refused = api.client.get("/api/schema/")
    assert (refused.status_code, refused.json()) == (403, {"message": "Forbidden"})
    assert api.client.get("/api/docs/").status_code == 403
    assert api.client.get("/api/schema/", headers={"x-api-key": admin_key}).status_code == 200


def test_the_api_helper_checks_every_response_against_the_published_document():
    """The shared ``Api`` helper fails a test whose response breaks the document: a body that does not match,
    or a status the route does not list."""
    import pytest

    from tests.conftest import Answer, check_against_schema

    with pytest.raises(AssertionError, match="does not match its published schema"):
        check_against_schema("GET", "/api/checkpoints", Answer(200, {"statusCode": "200"}, {}, b""))
    with pytest.raises(AssertionError, match="answered 418, which its schema does not list"):
        check_against_schema("GET", "/api/checkpoints/", Answer(418, {}, {}, b""))
    check_against_schema("GET", "/api/checkpoints", Answer(403, {"message": "Forbidden"}, {}, b""))
