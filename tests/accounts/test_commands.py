"""Ops commands: create_api_key, revoke_api_key, and Django's own user commands on our user model."""

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.accounts.models import ApiKey, User
from tests.conftest import Api, make_key

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_create_api_key_prints_the_key_alone_on_the_last_line(api: Api, admin):
    out, err = run("create_api_key", "admin")
    key = out.strip().splitlines()[-1]
    assert len(key) == 40 and key.isalnum()
    assert "personal key" in err and key[:8] in err
    stored = ApiKey.objects.get(user=admin)
    assert stored.digest != key and key not in stored.digest and stored.prefix == key[:8]
    assert stored.kind == "personal" and stored.expires_at is None
    assert api.get("ping", key=key).status == 200


def test_create_service_key_with_expiry(api: Api, admin, designer):
    out, _ = run("create_api_key", "admin", "--service", "--expires-days", "7", "--name", "webui")
    key = out.strip().splitlines()[-1]
    stored = ApiKey.objects.get(prefix=key[:8])
    assert (stored.kind, stored.name) == ("service", "webui")
    assert stored.expires_at is not None
    assert api.get("users", key=key, username="designer").status == 403  # acts as designer


def test_create_api_key_for_unknown_user_fails(db):
    with pytest.raises(CommandError, match="user ghost does not exist"):
        run("create_api_key", "ghost")


def test_create_api_key_refuses_non_positive_expiry(admin):
    with pytest.raises(CommandError):
        run("create_api_key", "admin", "--expires-days", "0")


def test_revoke_api_key_by_prefix(api: Api, admin):
    key = make_key(admin)
    out, _ = run("revoke_api_key", key[:8])
    assert "revoked" in out
    assert api.get("ping", key=key).status == 403
    out, _ = run("revoke_api_key", key)
    assert "already revoked" in out


def test_revoke_api_key_ambiguous_or_unknown(admin):
    keys = [make_key(admin) for _ in range(2)]
    ApiKey.objects.update(prefix="samepfx1")
    with pytest.raises(CommandError, match="matches 2 keys"):
        run("revoke_api_key", "samepfx1")
    with pytest.raises(CommandError, match="no API key starts with"):
        run("revoke_api_key", "zzzzzzzz")
    assert len(keys) == 2


def test_createsuperuser_and_changepassword_work_with_our_users(db, monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "root-pass-123")
    run("createsuperuser", "--noinput", "--username", "root", "--email", "root@example.com")
    root = User.objects.get(username="root")
    assert root.is_superuser and root.check_password("root-pass-123")
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "new-pass-456")
    run("changepassword", "root")
    root.refresh_from_db()
    assert root.check_password("new-pass-456")


def test_recover_work_runs(db):
    out, _ = run("recover_work")
    assert out.strip()


def test_password_sync_without_a_valid_key_fails_the_system_check(settings):
    from apps.accounts.checks import password_sync_needs_a_key

    settings.ESD_WEBUI_PASSWORD_SYNC = True
    settings.ESD_PASSWORD_ENCRYPTION_KEY = "not-a-key"
    assert [e.id for e in password_sync_needs_a_key(None)] == ["accounts.E001"]
    settings.ESD_PASSWORD_ENCRYPTION_KEY = "kR1nAhjXrP2P2yqJ7o9nU3HAIrKSpDS2Zc7tGb1rmyo="
    assert password_sync_needs_a_key(None) == []
