"""Ops faces of the registry: `import_checkpoint` and the console's checkpoint and dataset pages."""

import os
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.models_registry.models import Checkpoint
from apps.training.models import Dataset
from tests.conftest import Api, make_user
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db


def test_import_checkpoint_streams_a_file_in(tmp_path, disk_store, api: Api, admin_key):
    source = tmp_path / "v1-5-pruned.safetensors"
    data = os.urandom(3 * 1024 * 1024)
    source.write_bytes(data)
    out = StringIO()
    call_command("import_checkpoint", str(source), "--type", "Stable-diffusion", "--roles", "byoc", stdout=out)
    checkpoint = Checkpoint.objects.get()
    assert out.getvalue().split() == [str(checkpoint.id), "Stable-diffusion", "v1-5-pruned.safetensors", "Active"]
    assert checkpoint.status == "Active" and checkpoint.creator == "ESD"
    assert disk_store.read_bytes(f"{checkpoint.prefix}/v1-5-pruned.safetensors") == data
    listed = api.get("checkpoints", key=admin_key).body["data"]["checkpoints"][0]
    assert listed["allowed_roles_or_users"] == ["byoc"] and listed["name"] == ["v1-5-pruned.safetensors"]
    with pytest.raises(CommandError, match="already exists"):
        call_command("import_checkpoint", str(source), "--type", "Lora")
    with pytest.raises(CommandError, match="is not a file"):
        call_command("import_checkpoint", str(tmp_path / "missing.ckpt"), "--type", "Lora")


@pytest.fixture
def operator(client):
    user = make_user("operator", password="op-pass-123", is_staff=True, is_superuser=True)
    client.force_login(user)
    return user


def test_checkpoint_console_filters_and_bulk_actions(client, operator, disk_store):
    active = register("a.safetensors", data=b"a")
    other = register("b.safetensors", checkpoint_type="Lora", data=b"b")
    page = client.get("/admin/models_registry/checkpoint/?checkpoint_type__exact=Lora")
    assert page.status_code == 200 and b"b.safetensors" in page.content and b"a.safetensors" not in page.content
    assert b"a.safetensors" in client.get("/admin/models_registry/checkpoint/?q=a.safe").content
    assert client.get(f"/admin/models_registry/checkpoint/{active.pk}/change/").status_code == 200
    client.post("/admin/models_registry/checkpoint/", {"action": "disable", "_selected_action": [active.pk]})
    assert Checkpoint.objects.get(pk=active.pk).status == "Disabled"
    client.post("/admin/models_registry/checkpoint/", {"action": "enable", "_selected_action": [active.pk]})
    assert Checkpoint.objects.get(pk=active.pk).status == "Active"
    client.post(
        "/admin/models_registry/checkpoint/", {"action": "delete_with_files", "_selected_action": [active.pk, other.pk]}
    )
    assert not Checkpoint.objects.exists()
    assert list(disk_store.list("Stable-diffusion/")) == []


def test_dataset_console(client, operator, disk_store, api: Api, admin_key):
    body = {
        "dataset_name": "lego",
        "content": [{"filename": "1.png", "name": "1.png", "type": "image", "params": {}}],
        "params": {},
        "creator": "x",
    }
    api.post("datasets", body, key=admin_key)
    dataset = Dataset.objects.get()
    assert b"lego" in client.get("/admin/training/dataset/?status__exact=Initialed").content
    assert client.get(f"/admin/training/dataset/{dataset.pk}/change/").status_code == 200
    client.post("/admin/training/dataset/", {"action": "enable", "_selected_action": [dataset.pk]})
    assert Dataset.objects.get().status == "Enabled"
    client.post("/admin/training/dataset/", {"action": "delete_with_files", "_selected_action": [dataset.pk]})
    assert not Dataset.objects.exists()


def test_console_checkpoints_respect_visibility(client, disk_store):
    register("hidden.safetensors", owners=["Secret"])
    register("open.safetensors")
    from tests.conftest import make_role

    make_role("Viewers", ["checkpoint:list"])
    viewer = make_user("viewer", roles=("Viewers",), password="pw-viewer-1", is_staff=True)
    client.force_login(viewer)
    content = client.get("/admin/models_registry/checkpoint/").content
    assert b"open.safetensors" in content and b"hidden.safetensors" not in content
