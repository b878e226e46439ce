"""Contract §9.3: GET, POST and DELETE /users."""

import pytest
from cryptography.fernet import Fernet
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import ApiKey, User
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db

ADMIN_PERMS = ["checkpoint:all", "inference:all", "role:all", "sagemaker_endpoint:all", "train:all", "user:all"]


def test_list_shape_order_and_masks(api: Api, admin_key, designer):
    answer = api.get("users", key=admin_key)
    assert answer.body == {
        "statusCode": 200,
        "data": {
            "users": [
                {
                    "username": "designer",
                    "roles": ["Designer"],
                    "creator": "admin",
                    "permissions": ["checkpoint:list", "inference:all", "train:all"],
                    "password": "********",
                },
                {
                    "username": "api",
                    "roles": ["IT Operator"],
                    "creator": "ESD",
                    "permissions": ADMIN_PERMS,
                    "password": "*",
                },
                {
                    "username": "admin",
                    "roles": ["IT Operator"],
                    "creator": "admin",
                    "permissions": ADMIN_PERMS,
                    "password": "********",
                },
            ],
            "previous_evaluated_key": "not_applicable",
            "last_evaluated_key": "not_applicable",
        },
        "message": "OK",
    }


def test_permissions_are_the_deduplicated_union_of_roles(api: Api, admin_key):
    make_role("A", ["train:all", "checkpoint:list"])
    make_role("B", ["train:all", "inference:create"])
    make_user("both", roles=("A", "B"))
    user = api.get("users", key=admin_key, params={"username": "both"}).body["data"]["users"][0]
    assert user["roles"] == ["A", "B"]
    assert user["permissions"] == ["checkpoint:list", "inference:create", "train:all"]


def test_filter_by_exact_username(api: Api, admin_key, designer):
    users = api.get("users", key=admin_key, params={"username": "designer"}).body["data"]["users"]
    assert [u["username"] for u in users] == ["designer"]


def test_user_list_sees_self_and_created_users_only(api: Api):
    make_role("Lister", ["user:list"])
    lister = make_user("lister", roles=("Lister",))
    make_user("child", creator="lister")
    make_user("stranger", creator="admin")
    users = api.get("users", key=make_key(lister)).body["data"]["users"]
    assert [u["username"] for u in users] == ["lister", "child"]


def test_query_count_does_not_grow_with_users(api: Api, admin_key):
    def count() -> int:
        api.get("ping", key=admin_key)  # the key cache lives 1 s: fill it just before measuring
        with CaptureQueriesContext(connection) as queries:
            assert api.get("users", key=admin_key).status == 200
        return len(queries)

    make_role("A", ["train:all"])
    make_role("B", ["checkpoint:list"])
    for _ in range(2):  # records the key's last use and caches the key, outside the measurement
        api.get("ping", key=admin_key)
    for i in range(3):
        make_user(f"few{i}", roles=("A", "B"))
    few = count()
    for i in range(50):
        make_user(f"many{i}", roles=("A", "B"))
    assert count() == few
    assert few == 4  # caller's permissions, users, their roles, the roles' permissions (the key is cached)


class TestShowPassword:
    def test_gives_fresh_random_tokens_by_default(self, api: Api, admin_key, service_key):
        for key in (admin_key, service_key):
            first = api.get("users", key=key, username="admin", params={"show_password": "1"}).body["data"]["users"]
            second = api.get("users", key=key, username="admin", params={"show_password": "true"}).body["data"]["users"]
            tokens = {u["password"] for u in first} | {u["password"] for u in second}
            assert len(tokens) == 2 * len(first)
            assert all(len(t) == 32 and t != "admin-password-1" for t in tokens)

    def test_sync_reveals_only_to_an_admins_service_key(self, api: Api, settings):
        settings.ESD_WEBUI_PASSWORD_SYNC = True
        settings.ESD_PASSWORD_ENCRYPTION_KEY = Fernet.generate_key().decode()
        admin = make_user("admin", roles=("IT Operator",), password="s3cret-Password")
        service = make_key(admin, ApiKeyKind.SERVICE)
        personal = make_key(admin)
        stored = User.objects.get(username="admin")
        assert "s3cret-Password" not in stored.encrypted_password and stored.encrypted_password
        revealed = api.get("users", key=service, username="admin", params={"show_password": "1"}).body["data"]["users"]
        assert {u["username"]: u["password"] for u in revealed}["admin"] == "s3cret-Password"
        hidden = api.get("users", key=personal, params={"show_password": "1"}).body["data"]["users"]
        assert [u["password"] for u in hidden if u["username"] == "admin"] != ["s3cret-Password"]

    def test_nothing_reversible_is_stored_without_sync(self, admin):
        assert User.objects.get(pk=admin.pk).encrypted_password == ""


def test_create_answers_exactly_and_hashes(api: Api, admin_key):
    make_role("Designer", ["train:all"])
    answer = api.post(
        "users", {"username": "zoe", "password": "pw", "roles": ["Designer"], "creator": "x"}, key=admin_key
    )
    assert (answer.status, answer.raw) == (201, b'{"statusCode":201,"message":"Created"}')
    zoe = User.objects.get(username="zoe")
    assert zoe.creator == "admin"
    assert zoe.password != "pw" and zoe.check_password("pw")
    assert [g.name for g in zoe.groups.all()] == ["Designer"]


def test_create_replaces_password_and_roles(api: Api, admin_key):
    make_role("A", ["train:all"])
    make_role("B", ["checkpoint:list"])
    make_user("zoe", roles=("A",), password="old", creator="someone")
    api.post("users", {"username": "zoe", "password": "new", "roles": ["B"]}, key=admin_key)
    zoe = User.objects.get(username="zoe")
    assert zoe.check_password("new")
    assert [g.name for g in zoe.groups.all()] == ["B"]
    assert zoe.creator == "someone"


def test_unknown_role_is_refused(api: Api, admin_key):
    answer = api.post("users", {"username": "zoe", "password": "pw", "roles": ["Nope"]}, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": 'user roles "Nope" not exist'}
    assert not User.objects.filter(username="zoe").exists()


def test_cannot_assign_permissions_the_caller_lacks(api: Api):
    make_role("UserAdmin", ["user:all", "train:all"])
    key = make_key(make_user("ua", roles=("UserAdmin",)))
    answer = api.post("users", {"username": "zoe", "password": "pw", "roles": ["IT Operator"]}, key=key)
    assert answer.body == {
        "statusCode": 403,
        "message": "creator has no permission to assign permission [checkpoint:all] to others",
    }


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"username": "a b", "password": "p"},
            "username",
            'ECMA 262 regex "^[\\w.@+-]+$" does not match input string "a b"',
        ),
        (
            {"username": "u" * 151, "password": "p"},
            "username",
            f'string "{"u" * 151}" is too long (length: 151, allowed maximum: 150)',
        ),
        ({"username": "u", "password": ""}, "password", 'string "" is too short (length: 0, required minimum: 1)'),
        (
            {"username": "u", "password": "p", "roles": []},
            "roles",
            "array is too short: must have at least 1 elements but instance has 0 elements",
        ),
        ({"username": "u"}, "password", 'object has missing required properties (["password"])'),
    ],
)
def test_create_validation(api: Api, admin_key, body, field, message):
    answer = api.post("users", body, key=admin_key)
    assert answer.status == 400
    assert answer.body["message"] == f"[{message}]"
    assert answer.body["errors"] == {field: [message]}


def test_password_validation_is_opt_in(api: Api, admin_key, settings):
    assert api.post("users", {"username": "weak", "password": "1"}, key=admin_key).status == 201
    settings.ESD_PASSWORD_VALIDATION = True
    answer = api.post("users", {"username": "weak2", "password": "1"}, key=admin_key)
    assert answer.status == 400
    assert answer.body["message"].startswith("password is not strong enough: ")


def test_delete_removes_users_and_their_keys(api: Api, admin_key, designer, designer_key):
    answer = api.delete("users", {"user_name_list": ["designer", "ghost"]}, key=admin_key)
    assert (answer.status, answer.raw) == (204, b"")
    assert not User.objects.filter(username="designer").exists()
    assert not ApiKey.objects.filter(prefix=designer_key[:8]).exists()
    assert api.get("ping", key=designer_key).status == 403


def test_delete_ends_console_sessions(api: Api, admin_key, designer, client):
    from django.contrib.sessions.models import Session

    client.force_login(designer)
    assert Session.objects.count() == 1
    api.delete("users", {"user_name_list": ["designer"]}, key=admin_key)
    assert Session.objects.count() == 0


def test_delete_needs_user_all(api: Api, designer_key, admin):
    answer = api.delete("users", {"user_name_list": ["admin"]}, key=designer_key)
    assert answer.body == {"statusCode": 403, "message": "User designer has no permissions: ['user:all']"}
    assert User.objects.filter(username="admin").exists()
