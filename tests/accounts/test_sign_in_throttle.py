"""Issue 13: console and admin sign-in is throttled per user name and address (django-axes), and passwords typed
in the console must pass Django's validators."""

import pytest
from django.test import override_settings

from tests.conftest import make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def throttled():
    with override_settings(AXES_ENABLED=True, AXES_FAILURE_LIMIT=3):
        yield


def sign_in(client, path, password, address="10.0.0.1"):
    return client.post(path, {"username": "ann", "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize("path", ["/login/", "/admin/login/"])
def test_repeated_failures_lock_that_user_from_that_address(client, throttled, path):
    make_user("ann", password="ann-password-1", is_staff=True)
    for _ in range(2):
        assert sign_in(client, path, "wrong").status_code == 200  # the form again, with its error
    assert sign_in(client, path, "wrong").status_code == 429  # the third failure locks the pair
    locked = sign_in(client, path, "ann-password-1")  # even the right password, from here
    assert locked.status_code == 429 and b"Too many failed sign-ins" in locked.content
    # the same user from another address, and another user from this one, are not locked
    assert sign_in(client, path, "ann-password-1", address="10.0.0.2").status_code == 302
    client.logout()
    make_user("bob", password="bob-password-1", is_staff=True)
    other = client.post(path, {"username": "bob", "password": "bob-password-1"}, REMOTE_ADDR="10.0.0.1")
    assert other.status_code == 302


def test_a_success_resets_the_count(client, throttled):
    make_user("ann", password="ann-password-1")
    for _ in range(2):
        sign_in(client, "/login/", "wrong")
    assert sign_in(client, "/login/", "ann-password-1").status_code == 302
    client.logout()
    for _ in range(2):
        sign_in(client, "/login/", "wrong")
    assert sign_in(client, "/login/", "ann-password-1").status_code == 302


def test_console_passwords_pass_the_validators(client, admin):
    from apps.accounts.models import User

    client.force_login(admin)
    weak = client.post("/users/", {"username": "nina", "password": "123", "roles": ["IT Operator"]})
    assert weak.status_code == 400 and b"password is not strong enough" in weak.content
    assert not User.objects.filter(username="nina").exists()
    edit = client.post("/users/admin/", {"action": "save", "password": "password", "roles": ["IT Operator"]})
    assert edit.status_code == 400 and b"password is not strong enough" in edit.content


def test_a_forged_forwarded_for_header_does_not_escape_the_lockout(client, throttled):
    make_user("ann", password="ann-password-1")
    for attempt in range(3):
        client.post(
            "/login/",
            {"username": "ann", "password": "wrong"},
            REMOTE_ADDR="10.0.0.1",
            HTTP_X_FORWARDED_FOR=f"192.0.2.{attempt}",  # a new "address" on every try
        )
    locked = client.post("/login/", {"username": "ann", "password": "ann-password-1"}, REMOTE_ADDR="10.0.0.1")
    assert locked.status_code == 429
