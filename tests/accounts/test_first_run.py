"""Contract §13: seed data and first-run ``initial`` requests, honoured once, then ordinary."""

import pytest

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import Role, User
from apps.accounts.services import is_first_run
from tests.conftest import Api, make_key, make_user

pytestmark = pytest.mark.django_db


def test_seed_data():
    roles = {r.name: r for r in Role.objects.all()}
    assert set(roles) == {"IT Operator", "byoc"}
    for role in roles.values():
        assert role.creator == "ESD"
        assert sorted(p.codename for p in role.permissions.all()) == [
            "checkpoint:all",
            "inference:all",
            "role:all",
            "sagemaker_endpoint:all",
            "train:all",
            "user:all",
        ]
    api_user = User.objects.get(username="api")
    assert api_user.creator == "ESD"
    assert not api_user.has_usable_password()
    assert [g.name for g in api_user.groups.all()] == ["IT Operator"]
    assert not api_user.api_keys.exists()


@pytest.fixture
def webui_key():
    """What an operator gives the WebUI before any administrator exists: a service key of a keyless user."""
    return make_key(make_user("webui"), ApiKeyKind.SERVICE)


def test_first_run_creates_the_administrator(api: Api, webui_key):
    assert is_first_run()
    body = {"username": "admin", "password": "first-pass", "roles": ["byoc"], "initial": True, "creator": "admin"}
    answer = api.post("users", body, key=webui_key, username="admin")
    assert (answer.status, answer.body) == (
        201,
        {
            "statusCode": 201,
            "data": {"user": {"username": "admin", "roles": ["IT Operator"]}, "all_roles": ["IT Operator", "byoc"]},
            "message": "Created",
        },
    )
    admin = User.objects.get(username="admin")
    assert admin.check_password("first-pass") and admin.creator == "ESD"
    assert not is_first_run()


def test_initial_is_refused_to_non_admins_after_first_run(api: Api, webui_key):
    api.post("users", {"username": "admin", "password": "p", "initial": True}, key=webui_key, username="admin")
    # Now that somebody has a password, `initial` is an ordinary create: the keyless webui user has no rights.
    answer = api.post(
        "users", {"username": "admin", "password": "hijack", "initial": True}, key=webui_key, username="webui"
    )
    assert answer.body == {"statusCode": 403, "message": "User webui has no permissions: ['user:all']"}
    answer = api.post(
        "users", {"username": "admin", "password": "hijack", "initial": True}, key=webui_key, username="nobody"
    )
    assert answer.status == 401
    assert User.objects.get(username="admin").check_password("p")


def test_initial_after_first_run_succeeds_for_an_administrator(api: Api, webui_key):
    api.post("users", {"username": "admin", "password": "p", "initial": True}, key=webui_key, username="admin")
    answer = api.post(
        "users", {"username": "admin", "password": "p2", "initial": True}, key=webui_key, username="admin"
    )
    assert answer.status == 201
    assert answer.body["data"] == {"user": {"username": "admin", "roles": []}, "all_roles": ["IT Operator", "byoc"]}


def test_initial_false_during_first_run_is_an_ordinary_request(api: Api, webui_key):
    answer = api.post(
        "users", {"username": "admin", "password": "p", "initial": False}, key=webui_key, username="admin"
    )
    assert answer.status == 401


def test_first_run_role_needs_only_a_key(api: Api, webui_key):
    answer = api.post(
        "roles",
        {"role_name": "Designer", "permissions": ["train:all"], "initial": True},
        key=webui_key,
        username="admin",
    )
    assert answer.status == 201
    assert Role.objects.get(name="Designer").creator == "admin"
    answer = api.post(
        "roles", {"role_name": "IT Operator", "permissions": ["train:all"], "initial": True}, key=webui_key
    )
    assert answer.body == {"statusCode": 400, "message": "cannot update default role"}


def test_first_run_still_needs_a_valid_key(api: Api):
    answer = api.post("users", {"username": "admin", "password": "p", "initial": True}, username="admin")
    assert (answer.status, answer.body) == (403, {"message": "Forbidden"})
