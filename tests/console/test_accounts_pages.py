"""Console pages for users, roles and API keys: what each permission shows, and every change through the services."""

import html
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.accounts.choices import ApiKeyKind
from apps.accounts.models import ApiKey, Role, User, key_digest
from tests.conftest import make_key, make_role, make_user

pytestmark = pytest.mark.django_db

NEW_KEY = re.compile(r'id="new-key"[^>]*>([A-Za-z0-9]{40})<')


def page(response) -> str:
    return html.unescape(response.content.decode())


def signed_in(client, user):
    client.force_login(user)
    return client


# --- users ------------------------------------------------------------------------------------------------------


def users_page_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/users/")
    assert response.status_code == 200
    return len(queries)


def test_users_page_costs_the_same_queries_for_5_or_40_users(client, admin, designer):
    make_role("Painters", ["inference:create"])
    for i in range(3):
        make_user(f"u{i:02}", roles=("Painters", "Designer"))
    signed_in(client, admin)
    few = users_page_queries(client)
    for i in range(3, 38):
        make_user(f"u{i:02}", roles=("Painters",) if i % 2 else ("Designer", "Painters"))
    assert User.objects.count() >= 40
    assert users_page_queries(client) == few


def test_users_page_lists_roles_permissions_and_creator(client, admin, designer):
    text = page(signed_in(client, admin).get("/users/"))
    row = re.search(r'<tr data-username="designer">(.*?)</tr>', text, re.S).group(1)
    assert "Designer" in row and "inference:all" in row and "train:all" in row and ">admin<" in row
    assert 'data-username="admin"' in text and 'id="user-form"' in text


def test_create_user_through_the_form(client, admin, designer):
    response = signed_in(client, admin).post(
        "/users/", {"username": "nina", "password": "nina-password-1", "roles": ["Designer"]}
    )
    assert response.status_code == 302 and response["Location"] == "/users/"
    nina = User.objects.get(username="nina")
    assert nina.creator == "admin" and [g.name for g in nina.groups.all()] == ["Designer"]
    assert nina.check_password("nina-password-1")
    assert "User nina created." in page(client.get("/users/"))


def test_create_user_shows_the_service_error(client, admin):
    response = signed_in(client, admin).post(
        "/users/", {"username": "nina", "password": "pw-123456", "roles": ["Nope"]}
    )
    assert response.status_code == 400
    assert 'user roles "Nope" not exist' in page(response)
    assert not User.objects.filter(username="nina").exists()


def test_create_user_refuses_an_existing_name(client, admin, designer):
    response = signed_in(client, admin).post("/users/", {"username": "designer", "password": "x-pw-12345"})
    assert response.status_code == 400 and "already exists" in page(response)
    assert User.objects.get(username="designer").check_password("designer-password-1")


def test_create_user_refuses_a_bad_username(client, admin):
    response = signed_in(client, admin).post("/users/", {"username": "no spaces", "password": "x-pw-12345"})
    assert response.status_code == 400 and not User.objects.filter(username="no spaces").exists()


def test_edit_roles_keeps_the_password(client, admin, designer):
    make_role("Painters", ["inference:create"])
    response = signed_in(client, admin).post(
        "/users/designer/", {"action": "save", "password": "", "roles": ["Painters", "Designer"]}
    )
    assert response.status_code == 302 and response["Location"] == "/users/designer/"
    designer.refresh_from_db()
    assert sorted(g.name for g in designer.groups.all()) == ["Designer", "Painters"]
    assert designer.check_password("designer-password-1")
    assert designer.creator == "admin"


def test_edit_sets_the_password(client, admin, designer):
    signed_in(client, admin).post("/users/designer/", {"action": "save", "password": "fresh-pw-1", "roles": []})
    designer.refresh_from_db()
    assert designer.check_password("fresh-pw-1") and not designer.groups.exists()


def test_changing_your_own_password_keeps_you_signed_in(client, admin):
    signed_in(client, admin).post(
        "/users/admin/", {"action": "save", "password": "new-admin-pw", "roles": ["IT Operator"]}
    )
    admin.refresh_from_db()
    assert admin.check_password("new-admin-pw")
    assert client.get("/users/").status_code == 200


def test_edit_shows_the_service_refusal(client, db, designer):
    make_role("UserAdmins", ["user:all"])
    operator = make_user("ua", roles=("UserAdmins",))
    response = signed_in(client, operator).post("/users/designer/", {"action": "save", "roles": ["Designer"]})
    assert response.status_code == 403
    assert "creator has no permission to assign permission [checkpoint:list] to others" in page(response)
    # the option is flagged beforehand
    assert "Designer (has permissions you lack)" in page(client.get("/users/designer/"))


def test_delete_user_with_confirmation(client, admin, designer):
    key = make_key(designer)
    signed_in(client, admin)
    assert 'id="delete-confirm"' not in page(client.get("/users/designer/"))
    confirm = page(client.get("/users/designer/?delete"))
    assert 'id="delete-confirm"' in confirm and "Delete designer?" in confirm
    assert User.objects.filter(username="designer").exists()  # asking deletes nothing
    response = client.post("/users/designer/", {"action": "delete"})
    assert response.status_code == 302 and response["Location"] == "/users/"
    assert not User.objects.filter(username="designer").exists()
    assert not ApiKey.objects.filter(digest=key_digest(key)).exists()


def test_you_cannot_delete_yourself(client, admin):
    signed_in(client, admin).post("/users/admin/", {"action": "delete"})
    assert User.objects.filter(username="admin").exists()


def test_designer_without_user_permissions_gets_403(client, admin, designer):
    signed_in(client, designer)
    assert client.get("/users/").status_code == 403
    assert client.post("/users/", {"username": "x", "password": "pw-1234567"}).status_code == 403
    assert client.get("/users/admin/").status_code == 403
    assert client.post("/users/admin/", {"action": "delete"}).status_code == 403
    assert client.post("/users/admin/", {"action": "save", "password": "hijack-pw-1"}).status_code == 403
    admin.refresh_from_db()
    assert admin.check_password("admin-password-1") and not User.objects.filter(username="x").exists()


def test_user_list_holder_sees_without_forms(client, admin, designer):
    make_role("Auditors", ["user:list"])
    auditor = make_user("auditor", roles=("Auditors",))
    make_user("intern", creator="auditor")
    text = page(signed_in(client, auditor).get("/users/"))
    assert 'data-username="auditor"' in text and 'data-username="intern"' in text
    assert 'data-username="admin"' not in text  # neither themselves nor created by them
    assert 'id="user-form"' not in text and "Delete" not in text
    assert 'id="user-edit-form"' not in page(client.get("/users/intern/"))
    assert client.get("/users/admin/").status_code == 404
    assert client.post("/users/", {"username": "x", "password": "pw-1234567"}).status_code == 403
    assert client.post("/users/intern/", {"action": "delete"}).status_code == 403
    assert User.objects.filter(username="intern").exists()


# --- roles ------------------------------------------------------------------------------------------------------


def test_roles_page_lists_permissions_and_members(client, admin, designer):
    make_user("d2", roles=("Designer",))
    text = page(signed_in(client, admin).get("/roles/"))
    row = re.search(r'<tr data-role="Designer">(.*?)</tr>', text, re.S).group(1)
    assert "checkpoint:list" in row and "<td>2</td>" in row
    assert 'data-role="IT Operator"' in text and 'id="role-form"' in text
    assert text.count('type="checkbox" name="permissions"') == 18


def test_member_counts_are_not_narrowed_to_the_viewer(client, db):
    make_role("Readers", ["role:list"])
    reader = make_user("reader", roles=("Readers",))
    make_user("r2", roles=("Readers",))
    make_user("r3", roles=("Readers",))
    text = page(signed_in(client, reader).get("/roles/"))
    row = re.search(r'<tr data-role="Readers">(.*?)</tr>', text, re.S).group(1)
    assert "<td>3</td>" in row
    assert 'data-role="IT Operator"' not in text and 'id="role-form"' not in text
    assert client.post("/roles/", {"name": "X", "permissions": ["role:list"]}).status_code == 403


def test_create_role_through_the_form(client, admin):
    response = signed_in(client, admin).post("/roles/", {"name": "Painters", "permissions": ["inference:create"]})
    assert response.status_code == 302
    painters = Role.objects.get(name="Painters")
    assert painters.creator == "admin"
    assert [p.codename for p in painters.permissions.all()] == ["inference:create"]


def test_create_role_refuses_existing_and_empty(client, admin, designer):
    signed_in(client, admin)
    response = client.post("/roles/", {"name": "Designer", "permissions": ["user:all"]})
    assert response.status_code == 400 and "already exists" in page(response)
    assert client.post("/roles/", {"name": "Empty", "permissions": []}).status_code == 400
    assert not Role.objects.filter(name="Empty").exists()


def test_create_role_shows_check_role_errors(client, db):
    make_role("Creators", ["role:create", "role:list", "inference:all"])
    creator = make_user("maker", roles=("Creators",))
    signed_in(client, creator)
    text = page(client.get("/roles/"))
    assert 'id="role-form"' in text and "(you cannot grant it)" in text
    response = client.post("/roles/", {"name": "Big", "permissions": ["user:all"]})
    assert response.status_code == 400
    assert "creator maker have not permission to create role with permission: [user:all]" in page(response)
    assert client.post("/roles/", {"name": "Small", "permissions": ["inference:list"]}).status_code == 302
    assert Role.objects.get(name="Small").creator == "maker"
    # their own role: editable; someone else's: read-only, and the service refuses
    assert 'id="role-edit-form"' in page(client.get("/roles/Small/"))
    assert 'id="role-edit-form"' not in page(client.get("/roles/Creators/"))
    response = client.post("/roles/Creators/", {"action": "save", "permissions": ["inference:all"]})
    assert response.status_code == 400
    assert "creator maker not have permission to update role Creators" in page(response)


def test_edit_role_permissions(client, admin, designer):
    signed_in(client, admin)
    assert 'id="role-edit-form"' in page(client.get("/roles/Designer/"))
    response = client.post("/roles/Designer/", {"action": "save", "permissions": ["inference:list", "train:all"]})
    assert response.status_code == 302 and response["Location"] == "/roles/Designer/"
    role = Role.objects.get(name="Designer")
    assert sorted(p.codename for p in role.permissions.all()) == ["inference:list", "train:all"]


def test_it_operator_is_read_only(client, admin):
    signed_in(client, admin)
    text = page(client.get("/roles/IT%20Operator/"))
    assert 'id="role-edit-form"' not in text and 'id="role-readonly"' in text and "Delete role" not in text
    before = set(Role.objects.get(name="IT Operator").permissions.values_list("codename", flat=True))
    response = client.post("/roles/IT%20Operator/", {"action": "save", "permissions": ["inference:list"]})
    assert response.status_code == 400 and "cannot update default role" in page(response)
    response = client.post("/roles/IT%20Operator/", {"action": "delete"}, follow=True)
    assert "cannot delete default role" in page(response)
    role = Role.objects.get(name="IT Operator")
    assert set(role.permissions.values_list("codename", flat=True)) == before


def test_delete_role_with_confirmation(client, admin, designer):
    signed_in(client, admin)
    confirm = page(client.get("/roles/Designer/?delete"))
    assert 'id="delete-confirm"' in confirm and Role.objects.filter(name="Designer").exists()
    response = client.post("/roles/Designer/", {"action": "delete"})
    assert response.status_code == 302 and response["Location"] == "/roles/"
    assert not Role.objects.filter(name="Designer").exists()
    designer.refresh_from_db()
    assert not designer.groups.exists()


def test_role_names_with_odd_characters_have_pages(client, admin):
    make_role("a/b?c", ["inference:list"])
    text = page(signed_in(client, admin).get("/roles/"))
    assert 'href="/roles/a/b%3Fc/"' in text
    assert client.get("/roles/a/b%3Fc/").status_code == 200


def test_roles_pages_refuse_users_without_role_permissions(client, designer):
    signed_in(client, designer)
    assert client.get("/roles/").status_code == 403
    assert client.post("/roles/", {"name": "X", "permissions": ["train:all"]}).status_code == 403
    assert client.post("/roles/Designer/", {"action": "delete"}).status_code == 403
    assert Role.objects.filter(name="Designer").exists() and not Role.objects.filter(name="X").exists()


# --- API keys ---------------------------------------------------------------------------------------------------


def issue(client, **fields) -> tuple[int, str | None, str]:
    response = client.post("/keys/", {"name": "", "kind": "personal", "expires_days": "", **fields})
    text = page(response)
    found = NEW_KEY.search(text)
    return response.status_code, found.group(1) if found else None, text


def test_issue_shows_the_key_once(client, designer):
    signed_in(client, designer)
    form = page(client.get("/keys/"))
    assert 'id="key-form"' in form and 'id="key-submit"' in form and 'id="new-key"' not in form
    assert 'value="service"' not in form and 'id="key-user"' not in form
    status, raw, text = issue(client, name="laptop", expires_days="30")
    assert status == 200 and raw is not None
    assert 'id="copy-key"' in text and 'data-copy="#new-key"' in text and "will not be shown again" in text
    key = ApiKey.objects.get(prefix=raw[:8])
    assert key.digest == key_digest(raw) and key.user == designer and key.name == "laptop"
    assert key.kind == ApiKeyKind.PERSONAL and key.expires_at is not None
    again = page(client.get("/keys/"))
    assert raw not in again and 'id="new-key"' not in again and raw[:8] in again


def test_the_key_page_is_never_cached(client, designer):
    response = signed_in(client, designer).post("/keys/", {"kind": "personal"})
    assert "no-store" in response["Cache-Control"]


def test_issued_key_works_until_revoked(client, api, designer):
    signed_in(client, designer)
    _, raw, _ = issue(client)
    assert api.get("ping", key=raw).status == 200
    key = ApiKey.objects.get(prefix=raw[:8])
    response = client.post(f"/keys/{key.pk}/revoke/")
    assert response.status_code == 302 and response["Location"] == "/keys/"
    assert api.get("ping", key=raw).status == 403
    text = page(client.get("/keys/"))
    assert "revoked" in text and f'data-revoke="{key.prefix}"' not in text


def test_non_admin_cannot_issue_service_keys_or_for_others(client, admin, designer):
    signed_in(client, designer)
    status, raw, text = issue(client, kind="service")
    assert status == 403 and raw is None and "user:all" in text
    status, raw, _ = issue(client, user="admin")
    assert status == 403 and raw is None
    assert not ApiKey.objects.exists()


def test_non_admin_sees_and_revokes_only_their_own_keys(client, admin, designer):
    admin_raw = make_key(admin)
    own_raw = make_key(designer)
    signed_in(client, designer)
    text = page(client.get("/keys/"))
    assert own_raw[:8] in text and admin_raw[:8] not in text and 'id="other-keys"' not in text
    admin_key = ApiKey.objects.get(prefix=admin_raw[:8])
    assert client.post(f"/keys/{admin_key.pk}/revoke/").status_code == 404
    admin_key.refresh_from_db()
    assert admin_key.revoked_at is None


def test_admin_manages_everyones_keys(client, api, admin, designer):
    designer_raw = make_key(designer, name="theirs")
    signed_in(client, admin)
    text = page(client.get("/keys/"))
    # an IT Operator manages everyone's personal keys; service keys are for superusers only (issue 13)
    assert 'id="other-keys"' in text and designer_raw[:8] in text and 'value="service"' not in text
    assert designer_raw[:8] in page(client.get("/keys/?owner=designer"))
    assert designer_raw[:8] not in page(client.get("/keys/?owner=admin"))
    status, raw, text = issue(client, kind="personal", user="designer")
    assert status == 200 and raw is not None and "for designer" in text
    issued = ApiKey.objects.get(prefix=raw[:8])
    assert issued.user == designer and issued.kind == ApiKeyKind.PERSONAL
    assert issue(client, kind="service", user="designer")[0] == 403
    theirs = ApiKey.objects.get(prefix=designer_raw[:8])
    assert client.post(f"/keys/{theirs.pk}/revoke/").status_code == 302
    assert api.get("ping", key=designer_raw).status == 403
    status, raw, text = issue(client, user="ghost")
    assert status == 400 and raw is None and "No user ghost" in text


def test_revoke_returns_only_to_this_site(client, designer):
    raw = make_key(designer)
    key = ApiKey.objects.get(prefix=raw[:8])
    response = signed_in(client, designer).post(f"/keys/{key.pk}/revoke/", {"next": "https://evil.example/"})
    assert response["Location"] == "/keys/"


def test_keys_need_a_sign_in(client, db):
    assert client.get("/keys/").status_code == 302
    assert client.post("/keys/", {"kind": "personal"}).status_code == 302
    assert not ApiKey.objects.exists()
