"""The Endpoints console page: the live table, the deploy form with the service's messages, delete, permissions.

Self-hosted endpoints (the default backend) need nothing remote, so these run against the real services.
"""

from __future__ import annotations

import html
import re

import pytest

from apps.endpoints.models import Endpoint, EndpointOwner
from esd.owners import save_owners
from tests.conftest import make_role, make_user

pytestmark = pytest.mark.django_db

ONE_PER_ROLE = "role [IT Operator] has a valid endpoint already, not allow to have another one"


def deploy_body(**changes) -> dict:
    """What the form posts for an async self-hosted endpoint owned by the IT Operator role."""
    body = {
        "endpoint_name": "web",
        "endpoint_type": "Async",
        "backend": "self-hosted",
        "instance_type": "cpu",
        "initial_instance_count": "1",
        "min_instance_number": "0",
        "max_instance_number": "1",
        "assign_to_roles": ["IT Operator"],
        "custom_extensions": "",
        "custom_docker_image_uri": "",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def make_endpoint(name: str, owners=("IT Operator",), creator="admin", **fields) -> Endpoint:
    endpoint = Endpoint.objects.create(
        name=name, endpoint_type="Async", backend="self-hosted", instance_type="cpu", creator=creator, **fields
    )
    save_owners(EndpointOwner, endpoint, owners)
    return endpoint


def rows(page: str) -> list[str]:
    return re.findall(r'<tr data-endpoint="([^"]+)">', page)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.fixture
def signed_in(client, admin):
    client.force_login(admin)
    return client


def test_sign_in_is_needed(client, db):
    assert client.get("/endpoints/").status_code == 302


def test_page_has_the_deploy_form(signed_in):
    page = signed_in.get("/endpoints/").content.decode()
    assert '<form method="post" action="/endpoints/" id="deploy-form"' in page and 'id="deploy-submit"' in page
    for name in (
        "endpoint_name",
        "endpoint_type",
        "backend",
        "instance_type",
        "initial_instance_count",
        "autoscaling_enabled",
        "min_instance_number",
        "max_instance_number",
        "assign_to_roles",
        "custom_extensions",
        "custom_docker_image_uri",
    ):
        assert f'name="{name}"' in page, name
    assert '<option value="Real-time">' in page and '<option value="Async" selected>' in page
    assert '<option value="self-hosted" selected>' in page
    assert '<option value="sagemaker"' not in page  # not configured in tests: not offered
    assert '<option value="IT Operator" selected>' in page and '<option value="byoc">' in page  # own roles first
    assert 'hx-get="/endpoints/live" hx-trigger="every 3s"' in page
    assert "No endpoints yet." in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_deploy_then_the_row_shows_live_status(signed_in):
    response = signed_in.post("/endpoints/", deploy_body(), follow=True)
    assert response.redirect_chain == [("/endpoints/", 302)]
    assert messages_of(response) == ["Endpoint deployment started: esd-async-web"]
    endpoint = Endpoint.objects.get(name="esd-async-web")
    assert (endpoint.backend, endpoint.endpoint_type, endpoint.creator, endpoint.status) == (
        "self-hosted",
        "Async",
        "admin",
        "Creating",
    )
    assert [o.name for o in endpoint.owners.all()] == ["IT Operator"]
    page = response.content.decode()
    assert rows(page) == ["esd-async-web"]
    assert '<span class="badge status-Creating endpoint-status">Creating</span>' in page

    Endpoint.objects.filter(pk=endpoint.pk).update(status="InService", current_instance_count=2)
    live = signed_in.get("/endpoints/live").content.decode()
    assert "<html" not in live and rows(live) == ["esd-async-web"]
    assert '<span class="badge status-InService endpoint-status">InService</span>' in live
    cells = re.search(
        r'<td class="instances">(.*?)</td>.*?<td class="backlog">(.*?)</td>.*?<td class="desired">(.*?)</td>',
        live,
        re.S,
    )
    assert cells is not None
    instances, backlog, desired = (" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in cells.groups())
    assert (instances, backlog, desired) == ("2 of 1", "0", "1")


def test_deploy_with_autoscaling_and_a_generated_name(signed_in):
    body = deploy_body(
        endpoint_name="",
        endpoint_type="Real-time",
        autoscaling_enabled="true",
        min_instance_number="1",
        max_instance_number="3",
        custom_extensions="https://a.example/x https://a.example/x,https://b.example/y",
    )
    assert signed_in.post("/endpoints/", body).status_code == 302
    endpoint = Endpoint.objects.get()
    assert re.fullmatch(r"esd-real-time-[0-9a-f]{7}", endpoint.name)
    assert (endpoint.autoscaling, endpoint.min_instance_number, endpoint.max_instance_number) == (True, 1, 3)
    assert endpoint.custom_extensions == "https://a.example/x,https://b.example/y"
    assert "(autoscaling 1 to 3)" in signed_in.get("/endpoints/live").content.decode()


def test_one_endpoint_per_role_message_in_the_form(signed_in, settings):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = True
    assert signed_in.post("/endpoints/", deploy_body()).status_code == 302
    response = signed_in.post("/endpoints/", deploy_body(endpoint_name="second", instance_type="gpu-a"))
    assert response.status_code == 400
    page = response.content.decode()
    assert f'<p class="msg error deploy-error">{ONE_PER_ROLE}</p>' in page
    assert 'name="endpoint_name" value="second"' in page and 'value="gpu-a"' in page  # what was typed is kept
    assert rows(page) == ["esd-async-web"]
    assert Endpoint.objects.count() == 1
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    assert signed_in.post("/endpoints/", deploy_body(endpoint_name="second")).status_code == 302
    assert Endpoint.objects.count() == 2


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint_name": "web"}, 'Cannot create already existing model "esd-model-async-web"'),
        (
            {"endpoint_type": "Real-time", "autoscaling_enabled": "true", "min_instance_number": "0"},
            "min_instance_number should be at least 1 for real-time endpoint: web",
        ),
        (
            {"autoscaling_enabled": "true", "min_instance_number": "3", "max_instance_number": "2"},
            "max_instance_number should be at least min_instance_number: esd-async-web",
        ),
        ({"custom_extensions": "a b c d"}, "custom_extensions should be at most 3"),
        ({"custom_docker_image_uri": "1234.dkr.ecr/x:1"}, "custom_docker_image_uri is not supported by self-hosted"),
    ],
)
def test_service_messages_in_the_form(signed_in, settings, changes, message):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    if "Cannot create" in message:
        make_endpoint("esd-async-web", owners=("byoc",))
    response = signed_in.post("/endpoints/", deploy_body(**changes))
    assert response.status_code == 400
    assert message in html.unescape(response.content.decode())


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"endpoint_name": "bad_name"}, "letters and digits"),
        ({"endpoint_name": "x" * 21}, "at most 20 characters"),
        ({"instance_type": ""}, "This field is required."),
        ({"initial_instance_count": "0"}, "greater than or equal to 1"),
        ({"initial_instance_count": "1.5"}, "Enter a whole number."),
        ({"assign_to_roles": None}, "This field is required."),
        ({"assign_to_roles": ["no-such-role"]}, "Select a valid choice."),
        ({"backend": "sagemaker"}, "Select a valid choice."),
        ({"endpoint_type": "Serverless"}, "Select a valid choice."),
    ],
)
def test_form_validation(signed_in, changes, field):
    response = signed_in.post("/endpoints/", deploy_body(**changes))
    assert response.status_code == 400
    errors = re.findall(r'<span class="field-error">(.*?)</span>', html.unescape(response.content.decode()))
    assert any(field in error for error in errors), errors
    assert not Endpoint.objects.exists()


def test_delete_asks_first(signed_in):
    endpoint = make_endpoint("esd-async-gone")
    page = signed_in.get("/endpoints/").content.decode()
    assert f'action="/endpoints/{endpoint.id}/delete"' in page
    confirm = signed_in.get(f"/endpoints/{endpoint.id}/delete")
    assert confirm.status_code == 200
    assert "Delete esd-async-gone?" in confirm.content.decode() and 'id="confirm-delete"' in confirm.content.decode()
    assert Endpoint.objects.filter(pk=endpoint.pk).exists()
    response = signed_in.post(f"/endpoints/{endpoint.id}/delete", follow=True)
    assert messages_of(response) == ["Deleted esd-async-gone."]
    assert not Endpoint.objects.filter(pk=endpoint.pk).exists()
    assert rows(response.content.decode()) == []
    assert signed_in.post(f"/endpoints/{endpoint.id}/delete").status_code == 404


def test_list_only_users_see_rows_but_no_form_and_cannot_post(client, db):
    make_role("Watchers", ["sagemaker_endpoint:list"])
    client.force_login(make_user("watcher", roles=("Watchers",)))
    shared = make_endpoint("esd-async-shared", owners=("Watchers",), creator="watcher")
    make_endpoint("esd-async-private", owners=("IT Operator",))
    page = client.get("/endpoints/").content.decode()
    assert rows(page) == ["esd-async-shared"]
    assert 'id="deploy-form"' not in page and "Delete…" not in page
    response = client.post("/endpoints/", deploy_body(assign_to_roles=["Watchers"]))
    assert response.status_code == 403 and not Endpoint.objects.filter(name="esd-async-web").exists()
    assert client.get(f"/endpoints/{shared.id}/delete").status_code == 403
    assert client.post(f"/endpoints/{shared.id}/delete").status_code == 403
    assert Endpoint.objects.filter(pk=shared.pk).exists()
    assert rows(client.get("/endpoints/live").content.decode()) == ["esd-async-shared"]


def test_creators_delete_only_their_own(client, settings):
    settings.ESD_ONE_ENDPOINT_PER_ROLE = False
    make_role("Deployers", ["sagemaker_endpoint:create", "sagemaker_endpoint:list"])
    client.force_login(make_user("dep", roles=("Deployers",)))
    theirs = make_endpoint("esd-async-theirs", owners=("Deployers",), creator="admin")
    page = client.get("/endpoints/").content.decode()
    assert 'id="deploy-form"' in page and '<option value="Deployers" selected>' in page
    assert f"/endpoints/{theirs.id}/delete" not in page
    assert client.post(f"/endpoints/{theirs.id}/delete").status_code == 404
    assert (
        client.post("/endpoints/", deploy_body(endpoint_name="mine", assign_to_roles=["Deployers"])).status_code == 302
    )
    mine = Endpoint.objects.get(name="esd-async-mine")
    page = client.get("/endpoints/").content.decode()
    assert rows(page) == ["esd-async-mine", "esd-async-theirs"]
    assert f"/endpoints/{mine.id}/delete" in page
    assert client.post(f"/endpoints/{mine.id}/delete").status_code == 302
    assert list(Endpoint.objects.values_list("name", flat=True)) == ["esd-async-theirs"]


def test_users_without_endpoint_permissions_are_refused(client, db):
    client.force_login(make_user("nobody"))
    assert client.get("/endpoints/").status_code == 403
    assert client.get("/endpoints/live").status_code == 403


def test_workers_capabilities_from_their_heartbeat_show_on_the_page(signed_in):
    """A GPU worker's heartbeat carries its runtime's capability summary; the endpoint's row lists it."""
    from apps.endpoints.tasks import heartbeat
    from gpu_runtime import protocol
    from gpu_runtime.protocol import policy

    make_endpoint("esd-async-gpu")
    summary = protocol.capability_summary({**policy.capabilities(), "device": "cuda:0"})
    event = protocol.heartbeat("esd-async-gpu", "host-a/1", "g5.xlarge", summary)
    protocol.validate_event(event)
    heartbeat(event)
    page = html.unescape(signed_in.get("/endpoints/live").content.decode())
    assert f'data-digest="{summary["digest"]}"' in page and "on cuda:0" in page
    assert "Samplers: " + ", ".join(policy.SAMPLER_NAMES) in page
    assert "refused when enabled: adetailer" in page
