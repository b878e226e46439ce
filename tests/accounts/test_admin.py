"""The operator console's account pages (Django admin), driven through real HTTP requests."""

import re

import pytest

from apps.accounts.models import ApiKey, Role
from tests.conftest import Api, make_role, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(client):
    user = make_user("operator", password="op-pass-123", is_staff=True, is_superuser=True)
    client.force_login(user)
    return user


def test_login_page_and_index(client, operator):
    assert client.get("/admin/").status_code == 200
    assert b"ESD Server" in client.get("/admin/").content


@pytest.mark.parametrize(
    "url",
    [
        "/admin/accounts/user/",
        "/admin/accounts/role/",
        "/admin/accounts/apikey/",
        "/admin/accounts/user/add/",
        "/admin/accounts/role/add/",
        "/admin/accounts/apikey/add/",
    ],
)
def test_pages_render(client, operator, url):
    assert client.get(url).status_code == 200


def test_user_list_shows_roles(client, operator, designer):
    content = client.get("/admin/accounts/user/").content.decode()
    assert "Designer" in content and "IT Operator" in content


# The role page's quota inline (its formset's management form, as the browser sends it; empty: no quota).
NO_QUOTA = {
    "quota-TOTAL_FORMS": "0",
    "quota-INITIAL_FORMS": "0",
    "quota-MIN_NUM_FORMS": "0",
    "quota-MAX_NUM_FORMS": "1",
}


def test_role_add_with_esd_permissions(client, operator):
    response = client.post(
        "/admin/accounts/role/add/",
        {"name": "Painter", "esd_permissions": ["train:all", "inference:create"], **NO_QUOTA},
    )
    assert response.status_code == 302
    role = Role.objects.get(name="Painter")
    assert role.creator == "operator"
    assert sorted(p.codename for p in role.permissions.all()) == ["inference:create", "train:all"]


def test_role_add_with_a_quota(client, operator):
    quota = {**NO_QUOTA, "quota-TOTAL_FORMS": "1", "quota-0-gpu_seconds_per_day": "", "quota-0-concurrent_jobs": "4"}
    response = client.post("/admin/accounts/role/add/", {"name": "Team", "esd_permissions": ["train:all"], **quota})
    assert response.status_code == 302
    role = Role.objects.get(name="Team")
    assert (role.quota.gpu_seconds_per_day, role.quota.concurrent_jobs) == (None, 4)


def test_role_permissions_edit(client, operator):
    role = Role.objects.get(name="byoc")
    response = client.post(f"/admin/accounts/role/{role.pk}/change/", {"esd_permissions": ["train:list"], **NO_QUOTA})
    assert response.status_code == 302
    assert [p.codename for p in role.permissions.all()] == ["train:list"]


def test_role_form_applies_the_api_rules(client):
    make_role("Maker", ["role:create", "train:all"])
    client.force_login(make_user("maker", roles=("Maker",), password="pw-maker-1", is_staff=True))
    response = client.post("/admin/accounts/role/add/", {"name": "Greedy", "esd_permissions": ["user:all"]})
    assert response.status_code == 200
    assert "have not permission to create role with permission: [user:all]" in response.content.decode()
    assert not Role.objects.filter(name="Greedy").exists()
    response = client.post("/admin/accounts/role/add/", {"name": "Modest", "esd_permissions": ["train:list"]})
    assert response.status_code == 302
    modest = Role.objects.get(name="Modest")
    assert modest.creator == "maker"
    # Their own role they may edit; another's (byoc) they may not even open for change.
    assert client.get(f"/admin/accounts/role/{modest.pk}/change/").status_code == 200
    byoc = Role.objects.get(name="byoc")
    assert (
        client.post(f"/admin/accounts/role/{byoc.pk}/change/", {"esd_permissions": ["train:list"]}).status_code == 403
    )


def test_console_pages_follow_esd_permissions(client, designer):
    designer.is_staff = True
    designer.save()
    client.force_login(designer)
    assert client.get("/admin/accounts/user/").status_code == 403
    assert client.get("/admin/accounts/apikey/").status_code == 403
    assert "accounts/user" not in client.get("/admin/").content.decode()


def test_default_role_is_read_only(client, operator):
    role = Role.objects.get(name="IT Operator")
    response = client.post(f"/admin/accounts/role/{role.pk}/change/", {"esd_permissions": ["train:list"]})
    assert response.status_code == 403
    assert role.permissions.count() == 6
    assert client.post(f"/admin/accounts/role/{role.pk}/delete/", {"post": "yes"}).status_code == 403


def test_api_key_is_shown_once_then_only_its_prefix(client, operator, designer, api: Api):
    response = client.post(
        "/admin/accounts/apikey/add/", {"user": designer.pk, "name": "laptop", "kind": "personal"}, follow=True
    )
    content = response.content.decode()
    key = re.search(r"New API key for designer: ([A-Za-z0-9]{40})", content).group(1)
    assert api.get("ping", key=key).status == 200
    stored = ApiKey.objects.get(user=designer)
    detail = client.get(f"/admin/accounts/apikey/{stored.pk}/change/").content.decode()
    assert key not in detail and stored.prefix in detail
    assert key not in client.get("/admin/accounts/apikey/").content.decode()


def test_revoke_action(client, operator, designer, api: Api):
    from apps.accounts.services import issue_api_key

    stored, key = issue_api_key(designer)
    response = client.post("/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [stored.pk]})
    assert response.status_code == 302
    assert api.get("ping", key=key).status == 403
    stored.refresh_from_db()
    assert stored.status == "revoked"


def test_deleting_a_user_in_the_console_deletes_their_keys(client, operator, designer, designer_key):
    response = client.post(f"/admin/accounts/user/{designer.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not ApiKey.objects.filter(prefix=designer_key[:8]).exists()
