"""The console's frame: sign-in, navigation by ESD permissions, the dashboard and its live part."""

import pytest

from tests.conftest import make_role, make_user

pytestmark = pytest.mark.django_db


def test_pages_need_a_sign_in(client):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_sign_in_and_dashboard(client, admin):
    response = client.post("/login/", {"username": "admin", "password": "admin-password-1"})
    assert response.status_code == 302
    page = client.get("/").content.decode()
    for label in ("Dashboard", "Generate", "Gallery", "Models", "Endpoints", "Training", "Users", "Roles", "API keys"):
        assert f">{label}</a>" in page
    assert "Inference jobs" in page and "Endpoints" in page
    assert 'hx-get="/dashboard/live"' in page
    assert client.get("/dashboard/live").status_code == 200
    assert client.get("/login/").status_code == 200


def test_navigation_follows_permissions(client, db):
    make_role("Painters", ["inference:create", "checkpoint:list"])
    client.force_login(make_user("pat", roles=("Painters",), password="pw-pat-12345"))
    page = client.get("/").content.decode()
    assert ">Generate</a>" in page and ">Models</a>" in page
    for hidden in ("Users", "Roles", "Endpoints", "Training"):
        assert f">{hidden}</a>" not in page


def test_wrong_password(client, admin):
    response = client.post("/login/", {"username": "admin", "password": "nope"})
    assert response.status_code == 200 and "did not match" in response.content.decode()


def test_sign_out(client, admin):
    client.force_login(admin)
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302
