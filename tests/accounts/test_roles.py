"""Contract §9.2: GET, POST and DELETE /roles."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.models import Role, User
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db

ADMIN_PERMS = ["checkpoint:all", "inference:all", "role:all", "sagemaker_endpoint:all", "train:all", "user:all"]


def test_list_shape_and_order(api: Api, admin_key):
    make_role("Designer", ["train:all", "inference:create"])
    answer = api.get("roles", key=admin_key)
    assert answer.status == 200
    assert answer.body == {
        "statusCode": 200,
        "data": {
            "roles": [
                {"role_name": "byoc", "creator": "ESD", "permissions": ADMIN_PERMS},
                {"role_name": "IT Operator", "creator": "ESD", "permissions": ADMIN_PERMS},
                {"role_name": "Designer", "creator": "admin", "permissions": ["inference:create", "train:all"]},
            ],
            "previous_evaluated_key": "not_applicable",
            "last_evaluated_key": None,
        },
        "message": "OK",
    }


def test_filter_by_exact_name(api: Api, admin_key):
    answer = api.get("roles", key=admin_key, params={"role": "byoc"})
    assert [r["role_name"] for r in answer.body["data"]["roles"]] == ["byoc"]
    assert api.get("roles", key=admin_key, params={"role": "BYOC"}).body["data"]["roles"] == []


def test_without_role_all_only_created_or_held_roles_are_visible(api: Api):
    make_role("Lister", ["role:list", "role:create", "train:all"])
    lister = make_user("lister", roles=("Lister",))
    make_role("Mine", ["train:all"], creator="lister")
    make_role("Theirs", ["train:all"], creator="someone")
    answer = api.get("roles", key=make_key(lister))
    assert [r["role_name"] for r in answer.body["data"]["roles"]] == ["Mine", "Lister"]


def test_list_needs_permission(api: Api, designer_key):
    answer = api.get("roles", key=designer_key)
    assert answer.body == {"statusCode": 403, "message": "User designer has no permissions: ['role:all', 'role:list']"}


def test_query_count_does_not_grow_with_roles(api: Api, admin_key):
    def count() -> int:
        api.get("ping", key=admin_key)  # the key cache lives 1 s: fill it just before measuring
        with CaptureQueriesContext(connection) as queries:
            assert api.get("roles", key=admin_key).status == 200
        return len(queries)

    for _ in range(2):  # records the key's last use and caches the key, outside the measurement
        api.get("ping", key=admin_key)
    for i in range(3):
        make_role(f"few{i}", ["train:all", "checkpoint:list"])
    few = count()
    for i in range(40):
        make_role(f"many{i}", ["train:all", "checkpoint:list"])
    assert count() == few
    assert few == 3  # caller's permissions, roles, their permissions (the key is cached)


def test_create_answers_exactly(api: Api, admin_key):
    answer = api.post(
        "roles",
        {"role_name": "Designer", "permissions": ["train:all", "inference:create"], "creator": "ignored"},
        key=admin_key,
    )
    assert (answer.status, answer.raw) == (201, b'{"statusCode":201,"message":"role created"}')
    role = Role.objects.get(name="Designer")
    assert role.creator == "admin"
    assert sorted(p.codename for p in role.permissions.all()) == ["inference:create", "train:all"]


def test_create_replaces_permissions_and_keeps_creator(api: Api, admin_key):
    make_role("Designer", ["train:all"], creator="someone")
    api.post("roles", {"role_name": "Designer", "permissions": ["checkpoint:list"]}, key=admin_key)
    role = Role.objects.get(name="Designer")
    assert [p.codename for p in role.permissions.all()] == ["checkpoint:list"]
    assert role.creator == "someone"


def test_default_role_cannot_be_changed(api: Api, admin_key):
    answer = api.post("roles", {"role_name": "IT Operator", "permissions": ["train:list"]}, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": "cannot update default role"}
    assert Role.objects.get(name="IT Operator").permissions.count() == 6


def test_unknown_permission_string_is_a_validation_error(api: Api, admin_key):
    answer = api.post("roles", {"role_name": "x", "permissions": ["train:everything"]}, key=admin_key)
    assert answer.status == 400
    assert answer.body["errors"] == {
        "permissions.0": [
            'instance value ("train:everything") not found in enum (possible values: ["train:all","train:list",'
            '"train:create","checkpoint:all","checkpoint:list","checkpoint:create","inference:all","inference:list",'
            '"inference:create","sagemaker_endpoint:all","sagemaker_endpoint:list","sagemaker_endpoint:create",'
            '"user:all","user:list","user:create","role:all","role:list","role:create"])'
        ]
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"role_name": "", "permissions": ["train:all"]}, '[string "" is too short (length: 0, required minimum: 1)]'),
        (
            {"role_name": "r" * 101, "permissions": ["train:all"]},
            f'[string "{"r" * 101}" is too long (length: 101, allowed maximum: 100)]',
        ),
        (
            {"role_name": "r", "permissions": []},
            "[array is too short: must have at least 1 elements but instance has 0 elements]",
        ),
        (
            {"role_name": "r", "permissions": "train:all"},
            '[instance type (string) does not match any allowed primitive type (allowed: ["array"])]',
        ),
        (
            {"role_name": "r", "permissions": ["train:all"], "initial": "yes"},
            '[instance type (string) does not match any allowed primitive type (allowed: ["boolean"])]',
        ),
    ],
)
def test_create_validation(api: Api, admin_key, body, message):
    answer = api.post("roles", body, key=admin_key)
    assert (answer.status, answer.body["message"]) == (400, message)


class TestCreatorWithoutRoleAll:
    @pytest.fixture
    def creator_key(self):
        make_role("RoleMaker", ["role:create", "train:all", "checkpoint:list"])
        return make_key(make_user("maker", roles=("RoleMaker",)))

    def test_may_create_with_permissions_they_hold(self, api: Api, creator_key):
        answer = api.post(
            "roles", {"role_name": "Sub", "permissions": ["train:list", "checkpoint:list"]}, key=creator_key
        )
        assert answer.status == 201
        assert Role.objects.get(name="Sub").creator == "maker"

    def test_may_not_grant_what_they_lack(self, api: Api, creator_key):
        answer = api.post(
            "roles", {"role_name": "Sub", "permissions": ["train:all", "user:all", "role:all"]}, key=creator_key
        )
        assert answer.body == {
            "statusCode": 400,
            "message": "creator maker have not permission to create role with permission: [user:all]",
        }
        assert not Role.objects.filter(name="Sub").exists()

    def test_may_not_update_a_role_of_another_creator(self, api: Api, creator_key):
        make_role("Other", ["train:all"], creator="someone")
        answer = api.post("roles", {"role_name": "Other", "permissions": ["train:all"]}, key=creator_key)
        assert answer.body == {"statusCode": 400, "message": "creator maker not have permission to update role Other"}


def test_delete_removes_roles_and_memberships(api: Api, admin_key):
    make_role("Designer", ["train:all"])
    member = make_user("member", roles=("Designer",))
    answer = api.delete("roles", {"role_name_list": ["Designer", "Designer", "unknown"]}, key=admin_key)
    assert (answer.status, answer.raw) == (204, b"")
    assert not Role.objects.filter(name="Designer").exists()
    assert list(User.objects.get(pk=member.pk).groups.all()) == []


def test_delete_with_default_role_deletes_nothing(api: Api, admin_key):
    make_role("Designer", ["train:all"])
    answer = api.delete("roles", {"role_name_list": ["Designer", "IT Operator"]}, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": "cannot delete default role"}
    assert Role.objects.filter(name="Designer").exists()


def test_delete_needs_role_all(api: Api):
    make_role("Lister", ["role:list", "role:create"])
    answer = api.delete("roles", {"role_name_list": ["byoc"]}, key=make_key(make_user("l", roles=("Lister",))))
    assert answer.body == {"statusCode": 403, "message": "User l has no permissions: ['role:all']"}
    assert Role.objects.filter(name="byoc").exists()


def test_delete_validation(api: Api, admin_key):
    answer = api.delete("roles", {"role_name_list": []}, key=admin_key)
    assert answer.body["message"] == "[array is too short: must have at least 1 elements but instance has 0 elements]"
    answer = api.delete("roles", {}, key=admin_key)
    assert answer.body["errors"] == {"role_name_list": ['object has missing required properties (["role_name_list"])']}
