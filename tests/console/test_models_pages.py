"""The Models console page: list, filters, search, pagination, actions through forms, add by URL, permissions.

Real database and the local blob store on disk; the browser upload itself is exercised by the Playwright test.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from apps.models_registry import services
from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from apps.models_registry.services import new_checkpoint
from apps.models_registry.tasks import rename_checkpoint
from esd import keys
from esd.fetch import Probe
from esd.owners import save_owners
from tests.conftest import make_role, make_user

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


def register(
    name: str,
    *,
    owners=("IT Operator",),
    status=CheckpointStatus.ACTIVE,
    checkpoint_type="Stable-diffusion",
    creator="admin",
    data: bytes | None = None,
    **fields,
) -> Checkpoint:
    """A checkpoint row with its file name and owners (and optionally its file in the store)."""
    checkpoint = new_checkpoint(checkpoint_type, creator, {}, status=status, **fields)
    checkpoint.save()
    CheckpointFile.objects.create(checkpoint=checkpoint, position=0, name=name)
    save_owners(CheckpointOwner, checkpoint, owners)
    if data is not None:
        from esd.storage import blob_store

        blob_store().put_bytes(keys.in_prefix(checkpoint.prefix, name), data)
    return checkpoint


def page_of(client, url: str = "/models/", **params) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


def rows(page: str) -> list[str]:
    return re.findall(r'<tr id="checkpoint-[^"]+" data-checkpoint="([^"]+)"', page)


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


@pytest.fixture
def signed_in(client, admin):
    client.force_login(admin)
    return client


def test_sign_in_is_needed(client, db):
    assert client.get("/models/").status_code == 302


def test_list_filters_and_search(signed_in, disk_store):
    alpha = register("alpha.safetensors")
    beta = register("beta-style.safetensors", checkpoint_type="Lora", status=CheckpointStatus.DISABLED)
    gamma = register("Gamma.vae.pt", checkpoint_type="VAE")
    page = page_of(signed_in)
    assert set(rows(page)) == {str(alpha.id), str(beta.id), str(gamma.id)}
    assert rows(page)[0] == str(gamma.id)  # newest first
    for name in ("alpha.safetensors", "beta-style.safetensors", "Gamma.vae.pt", "IT Operator"):
        assert name in page
    assert 'class="badge status-Disabled checkpoint-status"' in page

    assert rows(page_of(signed_in, type="Lora")) == [str(beta.id)]
    assert set(rows(page_of(signed_in, status="Active"))) == {str(alpha.id), str(gamma.id)}
    assert rows(page_of(signed_in, q="gamma")) == [str(gamma.id)]  # case-insensitive, part of the name
    assert rows(page_of(signed_in, q="style", type="Lora", status="Disabled")) == [str(beta.id)]
    assert rows(page_of(signed_in, q="style", type="VAE")) == []
    assert "No checkpoints match these filters." in page_of(signed_in, q="nothing-like-this")
    assert set(rows(page_of(signed_in, type="bogus", status="bogus"))) == {str(alpha.id), str(beta.id), str(gamma.id)}


def test_a_checkpoint_with_two_matching_files_is_one_row(signed_in, disk_store):
    checkpoint = register("twin.safetensors")
    CheckpointFile.objects.create(checkpoint=checkpoint, position=1, name="twin.yaml")
    page = page_of(signed_in, q="twin")
    assert rows(page) == [str(checkpoint.id)]
    assert "twin.safetensors<br>twin.yaml" in page


def test_upload_panel_dom_for_the_browser_test(signed_in, disk_store):
    page = page_of(signed_in)
    for element in (
        '<input type="file" id="upload-file"',
        '<select id="upload-type">',
        'id="upload-start"',
        'id="upload-progress"',
        'id="upload-status"',
        'id="upload-resume"',
    ):
        assert element in page, element
    assert 'data-api="/api/checkpoints"' in page
    assert '<option value="Stable-diffusion">' in page and '<option value="Lora">' in page
    assert "/static/console/upload.js" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no asset from another host


def count_queries(client, **params) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/models/", params).status_code == 200
    return len(queries)


@pytest.mark.parametrize("who", ["admin", "creator"])
def test_queries_do_not_grow_with_rows(client, disk_store, admin, who):
    make_role("Makers", ["checkpoint:create", "checkpoint:list"])
    user = admin if who == "admin" else make_user("maker", roles=("Makers",))
    client.force_login(user)

    def fill(n: int) -> None:
        for i in range(Checkpoint.objects.count(), n):
            register(
                f"model-{i}.safetensors",
                owners=("Makers", "IT Operator"),
                creator=user.username if i % 2 else "someone",
                bytes_total=MiB,
            )

    fill(5)
    few = count_queries(client)
    fill(50)
    many = count_queries(client)
    assert few == many, (few, many)
    assert count_queries(client, q="model", type="Stable-diffusion", page=2) == many


def test_pagination_keeps_the_filters(signed_in, disk_store):
    made = [register(f"p{i:02}.safetensors") for i in range(30)]
    register("other.pt", checkpoint_type="VAE")
    first = page_of(signed_in, type="Stable-diffusion")
    assert rows(first) == [str(c.id) for c in reversed(made)][:25]
    assert "Page 1 of 2 · 30 checkpoints" in first
    assert 'href="?type=Stable-diffusion&amp;page=2" rel="next"' in first
    second = page_of(signed_in, type="Stable-diffusion", page=2)
    assert rows(second) == [str(c.id) for c in reversed(made)][25:]
    assert 'href="?type=Stable-diffusion&amp;page=1" rel="prev"' in second
    assert rows(page_of(signed_in, type="Stable-diffusion", page=99)) == rows(second)  # past the end: the last page


def test_enable_and_disable(signed_in, disk_store):
    checkpoint = register("switch.safetensors")
    page = page_of(signed_in)
    assert f'action="/models/{checkpoint.id}/status"' in page and ">Disable</button>" in page

    response = signed_in.post(
        f"/models/{checkpoint.id}/status", {"status": "Disabled", "next": "/models/?type=Stable-diffusion"}
    )
    assert response.status_code == 302 and response["Location"] == "/models/?type=Stable-diffusion"
    checkpoint.refresh_from_db()
    assert checkpoint.status == "Disabled"
    page = signed_in.get(response["Location"]).content.decode()
    assert "switch.safetensors is Disabled." in page and ">Enable</button>" in page

    response = signed_in.post(f"/models/{checkpoint.id}/status", {"status": "Active"}, follow=True)
    checkpoint.refresh_from_db()
    assert checkpoint.status == "Active"
    assert messages_of(response) == ["switch.safetensors is Active."]

    response = signed_in.post(f"/models/{checkpoint.id}/status", {"status": "Initial"}, follow=True)
    assert messages_of(response) == ["checkpoint status can not be changed from Active to Initial"]
    response = signed_in.post(f"/models/{checkpoint.id}/status", {"status": "Active", "next": "https://evil.test/"})
    assert response["Location"] == "/models/"  # never redirected off the site


def test_rename_queues_the_job(signed_in, disk_store, django_capture_on_commit_callbacks):
    checkpoint = register("old.safetensors", data=b"weights")
    assert f'action="/models/{checkpoint.id}/rename"' in page_of(signed_in)
    with django_capture_on_commit_callbacks() as callbacks:
        response = signed_in.post(f"/models/{checkpoint.id}/rename", {"name": "cartoony"}, follow=True)
    assert len(callbacks) == 1
    assert messages_of(response) == ["Renaming old.safetensors to cartoony… (a background job; reload in a moment)"]
    rename_checkpoint(str(checkpoint.id), "cartoony")  # what the worker runs
    assert [f.name for f in checkpoint.files.all()] == ["cartoony"]
    assert disk_store.read_bytes(f"{checkpoint.prefix}/cartoony") == b"weights"

    response = signed_in.post(f"/models/{checkpoint.id}/rename", {"name": "cartoony"}, follow=True)
    assert messages_of(response) == ["No need to update: the name is already cartoony."]
    register("taken")
    with django_capture_on_commit_callbacks() as callbacks:
        for bad in ("old.safetensors", "1abc", "x" * 21, "", "taken"):
            response = signed_in.post(f"/models/{checkpoint.id}/rename", {"name": bad}, follow=True)
            assert response.status_code == 200
            (message,) = messages_of(response)
            if bad == "taken":
                assert message == "taken already exists, please use another or rename/delete exists"
            else:
                assert message.startswith("a new name has 1 to 20 characters"), message
    assert callbacks == []
    disabled = register("off.safetensors", status=CheckpointStatus.DISABLED)
    assert f'action="/models/{disabled.id}/rename"' not in page_of(signed_in)  # only Active ones offer it
    response = signed_in.post(f"/models/{disabled.id}/rename", {"name": "x"}, follow=True)
    assert messages_of(response) == ["only active can update name"]


def test_delete_asks_first(signed_in, disk_store):
    checkpoint = register("doomed.safetensors", data=b"bytes")
    key = f"{checkpoint.prefix}/doomed.safetensors"
    confirm = signed_in.get(f"/models/{checkpoint.id}/delete", {"next": "/models/?q=doomed"})
    assert confirm.status_code == 200
    text = confirm.content.decode()
    assert "Delete doomed.safetensors?" in text and 'id="confirm-delete"' in text
    assert 'name="next" value="/models/?q=doomed"' in text
    assert Checkpoint.objects.filter(pk=checkpoint.pk).exists() and disk_store.exists(key)

    response = signed_in.post(f"/models/{checkpoint.id}/delete", {"next": "/models/?q=doomed"}, follow=True)
    assert response.redirect_chain == [("/models/?q=doomed", 302)]
    assert messages_of(response) == ["Deleted doomed.safetensors."]
    assert not Checkpoint.objects.filter(pk=checkpoint.pk).exists()
    assert not disk_store.exists(key)
    assert signed_in.post(f"/models/{checkpoint.id}/delete").status_code == 404


def test_list_only_users_see_no_actions_and_cannot_post(client, disk_store):
    make_role("Viewers", ["checkpoint:list"])
    client.force_login(make_user("viewer", roles=("Viewers",)))
    checkpoint = register("shared.safetensors", owners=("Viewers",), creator="viewer")
    page = page_of(client)
    assert rows(page) == [str(checkpoint.id)]
    for absent in ("upload-file", "url-form", ">Disable</button>", "Delete…", "Rename", "<th>Actions</th>"):
        assert absent not in page, absent
    assert client.get(f"/models/{checkpoint.id}/").status_code == 200
    for url, body in (
        (f"/models/{checkpoint.id}/status", {"status": "Disabled"}),
        (f"/models/{checkpoint.id}/rename", {"name": "other"}),
        (f"/models/{checkpoint.id}/delete", {}),
        ("/models/add-url", {"url": "https://example.com/a.safetensors", "checkpoint_type": "Lora"}),
    ):
        response = client.post(url, body)
        assert response.status_code == 403, url
        assert "checkpoint:all, checkpoint:create" in response.content.decode()
    assert client.get(f"/models/{checkpoint.id}/delete").status_code == 403
    checkpoint.refresh_from_db()
    assert checkpoint.status == "Active"


def test_creators_change_only_their_own(client, disk_store):
    make_role("Makers", ["checkpoint:create", "checkpoint:list"])
    client.force_login(make_user("maker", roles=("Makers",)))
    mine = register("mine.safetensors", owners=("Makers",), creator="maker")
    theirs = register("theirs.safetensors", owners=("Makers",), creator="admin")
    hidden = register("hidden.safetensors", owners=("Secret",), creator="maker")
    page = page_of(client)
    assert set(rows(page)) == {str(mine.id), str(theirs.id)}
    assert f"/models/{mine.id}/status" in page and f"/models/{theirs.id}/status" not in page
    assert f"/models/{theirs.id}/delete" not in page
    assert client.post(f"/models/{theirs.id}/status", {"status": "Disabled"}).status_code == 404
    assert client.post(f"/models/{theirs.id}/delete").status_code == 404
    assert client.get(f"/models/{hidden.id}/").status_code == 404
    assert client.get(f"/models/{hidden.id}/row").status_code == 404
    assert client.post(f"/models/{mine.id}/status", {"status": "Disabled"}).status_code == 302
    assert Checkpoint.objects.get(pk=theirs.pk).status == "Active"
    assert Checkpoint.objects.get(pk=mine.pk).status == "Disabled"


def test_add_by_url_shows_the_services_messages(signed_in, disk_store):
    response = signed_in.post("/models/add-url", {"url": "file:///x", "checkpoint_type": "Lora"})
    assert response.status_code == 400
    page = response.content.decode()
    assert '<p class="msg error" id="url-error">url file:///x is not allowed</p>' in page
    assert 'name="url" value="file:///x"' in page and '<option value="Lora" selected>' in page
    assert 'id="model-list"' in page  # the list is still there
    for body, message in (
        ({"url": "", "checkpoint_type": "Lora"}, "enter the URL of a model file"),
        ({"url": "https://example.com/a.pt", "checkpoint_type": "Nope"}, "choose a model type"),
        ({"url": "https://example.com/" + "a" * 2048, "checkpoint_type": "Lora"}, "longer than 2048 characters"),
    ):
        response = signed_in.post("/models/add-url", body)
        assert response.status_code == 400 and message in response.content.decode()
    assert not Checkpoint.objects.exists()


def test_add_by_url_starts_a_download(signed_in, disk_store, monkeypatch, django_capture_on_commit_callbacks):
    found = Probe(url="https://example.com/m", final_url="https://cdn.example.com/m", name="m.safetensors", size=None)
    monkeypatch.setattr(services, "probe", lambda url, guard: found)  # the address check without the network
    with django_capture_on_commit_callbacks() as callbacks:
        response = signed_in.post(
            "/models/add-url", {"url": "https://example.com/m", "checkpoint_type": "Lora"}, follow=True
        )
    assert len(callbacks) == 1  # the download job
    assert messages_of(response) == ["Downloading m.safetensors: the list shows its progress."]
    checkpoint = Checkpoint.objects.get()
    assert (checkpoint.status, checkpoint.source_url, checkpoint.creator) == ("Initial", found.final_url, "admin")
    assert [o.name for o in checkpoint.owners.all()] == ["IT Operator"]
    assert f'hx-get="/models/{checkpoint.id}/row" hx-trigger="every 2s"' in response.content.decode()
    response = signed_in.post("/models/add-url", {"url": "https://example.com/m", "checkpoint_type": "Lora"})
    assert response.status_code == 400
    assert "m.safetensors already exists, please use another or rename/delete exists" in response.content.decode()


def test_download_progress_partial(signed_in, disk_store):
    checkpoint = register(
        "big.safetensors",
        status=CheckpointStatus.INITIAL,
        source_url="https://example.com/big.safetensors",
        bytes_done=5 * MiB,
        bytes_total=20 * MiB,
    )
    page = page_of(signed_in)
    assert f'hx-get="/models/{checkpoint.id}/row" hx-trigger="every 2s" hx-swap="outerHTML"' in page
    row = signed_in.get(f"/models/{checkpoint.id}/row", headers={"HX-Request": "true"}).content.decode()
    assert row.strip().startswith(f'<tr id="checkpoint-{checkpoint.id}"')
    assert 'aria-valuenow="25"' in row and "5.0\xa0MB of 20.0\xa0MB" in row and "downloading…" in row
    assert "<html" not in row

    Checkpoint.objects.filter(pk=checkpoint.pk).update(bytes_done=20 * MiB, status=CheckpointStatus.ACTIVE)
    row = signed_in.get(f"/models/{checkpoint.id}/row", headers={"HX-Current-URL": "http://testserver/models/?page=1"})
    text = row.content.decode()
    assert "hx-trigger" not in text  # done: the row stops polling
    assert "status-Active" in text and "20.0\xa0MB" in text
    assert 'name="next" value="http://testserver/models/?page=1"' in text  # its forms return to the page shown


def test_failed_download_shows_its_error(signed_in, disk_store):
    register(
        "broken.safetensors",
        status=CheckpointStatus.DISABLED,
        source_url="https://example.com/broken.safetensors",
        error="download failed after 3 tries: 404",
    )
    page = page_of(signed_in)
    assert "download failed after 3 tries: 404" in page and "hx-trigger" not in page


def test_detail_page(signed_in, disk_store, settings):
    checkpoint = register("detail.safetensors", owners=("IT Operator", "byoc"))
    page = page_of(signed_in, f"/models/{checkpoint.id}/")
    assert "<code>detail.safetensors</code>" in page
    assert f"s3://{settings.ESD_BUCKET}/Stable-diffusion/checkpoint/custom/{checkpoint.id}" in page
    assert "IT Operator, byoc" in page
    assert "&quot;creator&quot;: &quot;admin&quot;" in page  # the API's params, creator included
    assert signed_in.get("/models/00000000-0000-4000-8000-000000000000/").status_code == 404
