"""Issue 13: no privilege escalation through users, roles or keys - in the API, the console, the admin and the
commands alike (one service function decides: ``apps.accounts.services``). Each test replays an attack."""

import pytest

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import ApiKey, Role, User
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def root(db) -> User:
    return make_user("root", password="root-password-1", is_superuser=True, is_staff=True)


@pytest.fixture
def usher(db) -> User:
    """Holds user:all and nothing else."""
    make_role("Ushers", ["user:all"])
    return make_user("usher", roles=("Ushers",), password="usher-password-1", is_staff=True)


def test_user_all_cannot_take_over_a_superuser_by_resetting_its_password(api: Api, root, usher, client):
    key = make_key(usher)
    answer = api.post("users", {"username": "root", "password": "taken-over-123", "roles": ["Ushers"]}, key=key)
    assert answer.status == 403 and "only a superuser may manage superuser root" in answer.body["message"]
    root.refresh_from_db()
    assert root.check_password("root-password-1") and not root.check_password("taken-over-123")
    assert not client.login(username="root", password="taken-over-123")


def test_user_all_cannot_change_or_delete_a_user_holding_more(api: Api, usher, admin):
    key = make_key(usher)
    answer = api.post("users", {"username": "admin", "password": "new-password-1", "roles": ["Ushers"]}, key=key)
    assert answer.status == 403 and "who holds [" in answer.body["message"]
    assert api.delete("users", {"user_name_list": ["admin", "usher2"]}, key=key).status == 403
    assert User.objects.filter(username="admin").exists()
    make_user("peer", roles=("Ushers",))  # the same rights: allowed
    assert (
        api.post("users", {"username": "peer", "password": "new-password-1", "roles": ["Ushers"]}, key=key).status
        == 201
    )
    assert api.delete("users", {"user_name_list": ["peer"]}, key=key).status == 204


def test_role_all_cannot_grant_what_it_lacks_even_on_its_own_role(api: Api):
    make_role("Keepers", ["role:all"])
    keeper = make_user("keeper", roles=("Keepers",))
    key = make_key(keeper)
    everything = ["train:all", "checkpoint:all", "inference:all", "sagemaker_endpoint:all", "user:all", "role:all"]
    answer = api.post("roles", {"role_name": "Keepers", "permissions": everything}, key=key)
    assert (
        answer.status == 400
        and "have not permission to create role with permission: [train:all]" in (answer.body["message"])
    )
    assert sorted(Role.objects.get(name="Keepers").permissions.values_list("codename", flat=True)) == ["role:all"]
    # nor rewrite (or delete) a role that holds more than it does
    make_role("Trainers", ["train:all"])
    assert api.post("roles", {"role_name": "Trainers", "permissions": []}, key=key).status == 400
    assert api.delete("roles", {"role_name_list": ["Trainers"]}, key=key).status == 403
    assert Role.objects.filter(name="Trainers").exists()
    assert api.post("roles", {"role_name": "Listers", "permissions": ["role:list"]}, key=key).status == 201


def test_only_superusers_issue_service_keys_in_the_console(client, usher, root):
    from tests.console.test_accounts_pages import issue, signed_in

    signed_in(client, usher)
    status, raw, text = issue(client, kind="service")
    assert status == 403 and raw is None and "service keys are issued only by superusers" in text
    status, raw, _ = issue(client, kind="personal", user="root")  # nor any key for a superuser
    assert status == 403 and raw is None
    assert not ApiKey.objects.filter(kind=ApiKeyKind.SERVICE).exists()
    client.logout()
    client.force_login(root)
    status, raw, _ = issue(client, kind="service")
    assert status == 200 and raw and ApiKey.objects.get(kind=ApiKeyKind.SERVICE).user == root


def test_the_admin_applies_the_same_rules(client, usher, root):
    client.force_login(usher)
    page = client.post(
        "/admin/accounts/apikey/add/", {"user": usher.pk, "name": "x", "kind": "service", "expires_days": ""}
    )
    assert page.status_code == 200 and b"service keys are issued only by superusers" in page.content
    assert not ApiKey.objects.exists()
    view = client.get(f"/admin/accounts/user/{root.pk}/change/")  # view-only at most
    assert view.status_code == 200 and b'name="_save"' not in view.content
    change = client.post(f"/admin/accounts/user/{root.pk}/change/", {"username": "root", "is_superuser": "on"})
    assert change.status_code == 403
    assert client.post(f"/admin/accounts/user/{root.pk}/delete/", {"post": "yes"}).status_code == 403
    assert User.objects.filter(username="root").exists()
    # making oneself a superuser through the admin is not offered
    own = client.get(f"/admin/accounts/user/{usher.pk}/change/").content.decode()
    assert 'name="is_superuser"' not in own and 'name="is_staff"' not in own


def test_create_api_key_still_issues_service_keys_with_the_servers_own_rights(admin):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("create_api_key", "admin", "--service", stdout=out, stderr=StringIO())
    assert ApiKey.objects.get(kind=ApiKeyKind.SERVICE).user == admin and len(out.getvalue().strip()) == 40


def test_the_admin_does_not_give_roles_holding_more_than_the_actor(client, usher):
    from apps.accounts.models import Role

    peer = make_user("peer", roles=("Ushers",))
    operators = Role.objects.get(name="IT Operator")
    client.force_login(usher)
    page = client.get(f"/admin/accounts/user/{peer.pk}/change/")
    assert page.status_code == 200 and b'name="_save"' in page.content  # a peer may be managed
    form = {"username": "peer", "groups": [operators.pk], "is_active": "on", "date_joined_0": "2026-01-01"}
    form.update({"date_joined_1": "00:00:00", "_save": "Save"})
    answer = client.post(f"/admin/accounts/user/{peer.pk}/change/", form)
    assert answer.status_code == 200 and b"creator has no permission to assign permission" in answer.content
    assert list(peer.groups.values_list("name", flat=True)) == ["Ushers"]
