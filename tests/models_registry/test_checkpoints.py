"""Contract §9.4 and §11: checkpoints through the API, with real part uploads in both storage modes."""

import hashlib
import os
import re

import pytest
import requests
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from apps.models_registry.services import new_checkpoint
from apps.models_registry.tasks import rename_checkpoint
from esd import keys
from esd.owners import save_owners
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def register(
    name: str,
    *,
    owners=(),
    status=CheckpointStatus.ACTIVE,
    checkpoint_type="Stable-diffusion",
    creator="admin",
    data: bytes | None = None,
) -> Checkpoint:
    """A checkpoint row (and optionally its file) made directly, for list and visibility tests."""
    checkpoint = new_checkpoint(checkpoint_type, creator, {}, status=status)
    checkpoint.save()
    CheckpointFile.objects.create(checkpoint=checkpoint, position=0, name=name)
    save_owners(CheckpointOwner, checkpoint, owners)
    if data is not None:
        from esd.storage import blob_store

        blob_store().put_bytes(keys.in_prefix(checkpoint.prefix, name), data)
    return checkpoint


def upload_parts(urls: list[str], chunks: list[bytes]) -> list[dict]:
    tags = []
    for number, (url, chunk) in enumerate(zip(urls, chunks, strict=True), start=1):
        answer = requests.put(url, data=chunk, timeout=60)
        assert answer.status_code == 200, answer.text
        tags.append({"ETag": answer.headers["ETag"], "PartNumber": number})
    return tags


def test_multipart_upload_end_to_end(api: Api, admin_key, store, settings):
    body = {
        "checkpoint_type": "Stable-diffusion",
        "params": {"message": "base model"},
        "filenames": [{"filename": "v1.safetensors", "parts_number": 2}, {"filename": "v1.yaml", "parts_number": 1}],
    }
    created = api.post("checkpoints", body, key=admin_key)
    assert created.status == 201, created.body
    data = created.body["data"]
    checkpoint_id = data["checkpoint"]["id"]
    assert UUID.match(checkpoint_id)
    assert data["checkpoint"]["status"] == "Initial"
    assert data["checkpoint"]["s3_location"] == (
        f"s3://{settings.ESD_BUCKET}/Stable-diffusion/checkpoint/custom/{checkpoint_id}"
    )
    assert data["checkpoint"]["params"]["message"] == "base model"
    assert data["checkpoint"]["params"]["creator"] == "admin"
    upload = data["checkpoint"]["params"]["multipart_upload"]["v1.safetensors"]
    assert upload["bucket"] == settings.ESD_BUCKET
    assert upload["key"] == f"Stable-diffusion/checkpoint/custom/{checkpoint_id}/v1.safetensors"
    assert [len(v) for v in data["s3PresignUrl"].values()] == [2, 1]

    model = [os.urandom(5 * MiB), os.urandom(100_000)]
    config = [b"model:\n  target: ldm\n"]
    tags = {
        "v1.safetensors": upload_parts(data["s3PresignUrl"]["v1.safetensors"], model),
        "v1.yaml": upload_parts(data["s3PresignUrl"]["v1.yaml"], config),
    }
    done = api.put(f"checkpoints/{checkpoint_id}", {"status": "Active", "multi_parts_tags": tags}, key=admin_key)
    assert done.status == 200, done.body
    assert done.body["data"]["checkpoint"]["status"] == "Active"

    from esd.storage import blob_store

    store = blob_store()
    downloaded = requests.get(store.presign_get(upload["key"], 60), timeout=60).content
    assert hashlib.sha256(downloaded).digest() == hashlib.sha256(b"".join(model)).digest()
    assert store.read_bytes(f"Stable-diffusion/checkpoint/custom/{checkpoint_id}/v1.yaml") == config[0]

    listed = api.get("checkpoints", key=admin_key).body["data"]
    assert listed["total"] == 1
    item = listed["checkpoints"][0]
    assert item["name"] == ["v1.safetensors", "v1.yaml"]
    assert item["status"] == "Active"
    assert item["s3Location"] == data["checkpoint"]["s3_location"]
    assert item["allowed_roles_or_users"] == ["IT Operator"]
    assert re.match(r"^\d+\.\d{6}$", item["created"])
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$", item["params"]["created"])


def test_completion_refused_by_storage_then_retried(api: Api, admin_key, store):
    created = api.post(
        "checkpoints",
        {
            "checkpoint_type": "Lora",
            "params": {},
            "filenames": [
                {"filename": "a.safetensors", "parts_number": 1},
                {"filename": "b.safetensors", "parts_number": 1},
            ],
        },
        key=admin_key,
    ).body["data"]
    checkpoint_id = created["checkpoint"]["id"]
    good_a = upload_parts(created["s3PresignUrl"]["a.safetensors"], [b"aaa"])
    good_b = upload_parts(created["s3PresignUrl"]["b.safetensors"], [b"bbb"])
    bad_b = [{"ETag": '"00000000000000000000000000000000"', "PartNumber": 1}]
    refused = api.put(
        f"checkpoints/{checkpoint_id}",
        {"status": "Active", "multi_parts_tags": {"a.safetensors": good_a, "b.safetensors": bad_b}},
        key=admin_key,
    )
    assert refused.status == 400
    assert refused.body["message"].startswith("failed to complete multipart upload of b.safetensors: ")
    checkpoint = Checkpoint.objects.get(pk=checkpoint_id)
    assert checkpoint.status == "Initial" and list(checkpoint.open_uploads) == ["b.safetensors"]
    retried = api.put(
        f"checkpoints/{checkpoint_id}",
        {"status": "Active", "multi_parts_tags": {"b.safetensors": good_b}},
        key=admin_key,
    )
    assert retried.status == 200
    assert retried.body["data"]["checkpoint"]["status"] == "Active"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"status": "Active"}, "multi parts tags is empty"),
        ({"status": "Active", "multi_parts_tags": {}}, "multi parts tags is empty"),
        (
            {"status": "Disabled", "multi_parts_tags": {"x.safetensors": []}},
            "checkpoint status can not be changed from Initial to Disabled",
        ),
        ({"status": "Active", "multi_parts_tags": {"other.bin": []}}, "multi parts tags of x.safetensors is missing"),
    ],
)
def test_open_upload_rules(api: Api, admin_key, disk_store, body, message):
    created = api.post(
        "checkpoints",
        {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": "x.safetensors", "parts_number": 1}]},
        key=admin_key,
    ).body["data"]
    answer = api.put(f"checkpoints/{created['checkpoint']['id']}", body, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": message}


def test_enable_disable_without_uploads(api: Api, admin_key, disk_store):
    checkpoint = register("m.safetensors")
    path = f"checkpoints/{checkpoint.id}"
    assert api.put(path, {"status": "Disabled"}, key=admin_key).body["data"]["checkpoint"]["status"] == "Disabled"
    assert api.put(path, {"status": "Disabled"}, key=admin_key).status == 200  # same status: no-op
    assert api.put(path, {"status": "Active"}, key=admin_key).body["data"]["checkpoint"]["status"] == "Active"
    answer = api.put(path, {"status": "Initial"}, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": "checkpoint status can not be changed from Active to Initial"}
    assert api.put(path, {}, key=admin_key).body == {"statusCode": 200, "message": "OK"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"checkpoint_type": "Lora", "params": {}}, "no checkpoint name (file names) detected"),
        (
            {
                "checkpoint_type": "Lora",
                "params": {},
                "urls": ["http://x/a.pt"],
                "filenames": [{"filename": "a.pt", "parts_number": 1}],
            },
            "filenames and urls cannot be used together",
        ),
        (
            {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": "../a.pt", "parts_number": 1}]},
            "filename ../a.pt is not allowed",
        ),
        (
            {
                "checkpoint_type": "Lora",
                "params": {},
                "filenames": [{"filename": "a.pt", "parts_number": 1}, {"filename": "a.pt", "parts_number": 1}],
            },
            "a.pt already exists, please use another or rename/delete exists",
        ),
        (
            {
                "checkpoint_type": "Lora",
                "params": {},
                "filenames": [{"filename": "taken.safetensors", "parts_number": 1}],
            },
            "taken.safetensors already exists, please use another or rename/delete exists",
        ),
    ],
)
def test_create_rules(api: Api, admin_key, disk_store, body, message):
    register("taken.safetensors")
    answer = api.post("checkpoints", body, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": message}
    assert Checkpoint.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (
            {"checkpoint_type": "Foo", "params": {}, "filenames": [{"filename": "a", "parts_number": 1}]},
            {
                "checkpoint_type": [
                    'instance value ("Foo") not found in enum (possible values: ["Stable-diffusion",'
                    '"embeddings","Lora","hypernetworks","ControlNet","VAE","ESRGAN","GFPGAN","Codeformer","rembg",'
                    '"ControlNetAnnotator"])'  # issue 14
                ]
            },
        ),
        (
            {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": "a", "parts_number": 0}]},
            {
                "filenames.0.parts_number": [
                    "numeric instance is lower than the required minimum (minimum: 1, found: 0)"
                ]
            },
        ),
        (
            {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": "a", "parts_number": 1, "x": 1}]},
            {"filenames.0.x": ["unexpected property"]},
        ),
        (
            {"checkpoint_type": "Lora", "filenames": [{"filename": "a", "parts_number": 1}]},
            {"params": ['object has missing required properties (["params"])']},
        ),
    ],
)
def test_create_validation(api: Api, admin_key, body, errors):
    answer = api.post("checkpoints", body, key=admin_key)
    assert answer.status == 400
    assert answer.body["errors"] == errors


def test_rename_through_the_job(api: Api, admin_key, disk_store, django_capture_on_commit_callbacks):
    checkpoint = register("old.safetensors", data=b"weights")
    path = f"checkpoints/{checkpoint.id}"
    assert api.put(path, {"name": "old.safetensors"}, key=admin_key).status == 400  # pattern: no dots
    with django_capture_on_commit_callbacks() as callbacks:
        answer = api.put(path, {"name": "cartoony"}, key=admin_key)
    assert (answer.status, answer.body) == (202, {"statusCode": 202, "message": "rename is processing, please wait"})
    assert len(callbacks) == 1
    rename_checkpoint(str(checkpoint.id), "cartoony")  # what the worker runs
    assert [f.name for f in checkpoint.files.all()] == ["cartoony"]
    assert disk_store.read_bytes(f"{checkpoint.prefix}/cartoony") == b"weights"
    assert not disk_store.exists(f"{checkpoint.prefix}/old.safetensors")
    assert api.put(path, {"name": "cartoony"}, key=admin_key).body == {
        "statusCode": 200,
        "message": "no need to update",
    }
    register("taken", data=b"")
    assert api.put(path, {"name": "taken"}, key=admin_key).body["message"] == (
        "taken already exists, please use another or rename/delete exists"
    )
    disabled = register("off.safetensors", status=CheckpointStatus.DISABLED)
    assert api.put(f"checkpoints/{disabled.id}", {"name": "x"}, key=admin_key).body == {
        "statusCode": 400,
        "message": "only active can update name",
    }


def test_unknown_or_malformed_id_is_the_routes_404(api: Api, admin_key):
    for checkpoint_id in ("not-a-uuid", "6f1d0c4e-3b7a-4c5e-9a51-0d5c1b6e2f10", "%00"):
        answer = api.put(f"checkpoints/{checkpoint_id}", {"status": "Active"}, key=admin_key)
        assert answer.body == {
            "statusCode": 404,
            "message": f"checkpoint not found with id {checkpoint_id}"
            if checkpoint_id != "%00"
            else "checkpoint not found with id \x00",
        }


def test_delete_removes_rows_objects_and_open_uploads(api: Api, admin_key, store):
    active = register("gone.safetensors", data=b"weights")
    created = api.post(
        "checkpoints",
        {"checkpoint_type": "Lora", "params": {}, "filenames": [{"filename": "half.safetensors", "parts_number": 1}]},
        key=admin_key,
    ).body["data"]
    upload_parts(created["s3PresignUrl"]["half.safetensors"], [b"partial"])
    answer = api.delete(
        "checkpoints",
        {"checkpoint_id_list": [str(active.id), created["checkpoint"]["id"], str(active.id), "junk"]},
        key=admin_key,
    )
    assert (answer.status, answer.raw) == (204, b"")
    assert not Checkpoint.objects.exists()
    assert not CheckpointFile.objects.filter(name__in=["gone.safetensors", "half.safetensors"]).exists()
    from esd.storage import blob_store

    assert list(blob_store().list(active.prefix + "/")) == []


class TestVisibility:
    """Alice (role Painters) sees her role's checkpoints; Bob (role Sculptors) does not; user:all sees all."""

    @pytest.fixture
    def cast(self, db):
        make_role("Painters", ["checkpoint:all"])
        make_role("Sculptors", ["checkpoint:list", "checkpoint:create"])
        alice = make_user("alice", roles=("Painters",))
        bob = make_user("bob", roles=("Sculptors",))
        return {
            "alice": make_key(alice),
            "bob": make_key(bob),
            "painters": register("painters.safetensors", owners=["Painters"], creator="alice"),
            "public": register("public.safetensors", owners=[]),
            "star": register("star.safetensors", owners=["*"]),
            "bobs": register("bobs.safetensors", owners=["bob"], creator="bob"),
        }

    def names(self, api: Api, key: str, **params) -> set[str]:
        answer = api.get("checkpoints", key=key, params={"per_page": 100, **params})
        assert answer.status == 200, answer.body
        return {n for c in answer.body["data"]["checkpoints"] for n in c["name"]}

    def test_lists(self, api: Api, cast, admin_key):
        assert self.names(api, cast["alice"]) == {"painters.safetensors", "public.safetensors", "star.safetensors"}
        assert self.names(api, cast["bob"]) == {"public.safetensors", "star.safetensors", "bobs.safetensors"}
        assert len(self.names(api, admin_key)) == 4

    def test_created_roles_count(self, api: Api, cast):
        make_role("BobsCrew", ["train:all"], creator="bob")
        register("crew.safetensors", owners=["BobsCrew"])
        assert "crew.safetensors" in self.names(api, cast["bob"])

    def test_filters(self, api: Api, cast, admin_key):
        assert self.names(api, admin_key, username="alice") == {
            "painters.safetensors",
            "public.safetensors",
            "star.safetensors",
        }
        assert self.names(api, admin_key, roles="Painters") == {"painters.safetensors"}
        register("lora.safetensors", checkpoint_type="Lora", status=CheckpointStatus.DISABLED)
        assert self.names(api, admin_key, types="Lora") == {"lora.safetensors"}
        assert self.names(api, admin_key, **{"status[]": "Disabled"}) == {"lora.safetensors"}
        answer = api.get("checkpoints", key=admin_key, params={"username": "nobody"})
        assert answer.body == {"statusCode": 400, "message": 'user: "nobody" not exist'}

    def test_invisible_ids_are_404_and_skipped_by_bulk_delete(self, api: Api, cast):
        painters = cast["painters"]
        answer = api.put(f"checkpoints/{painters.id}", {"status": "Disabled"}, key=cast["bob"])
        assert answer.body == {"statusCode": 404, "message": f"checkpoint not found with id {painters.id}"}
        assert api.delete("checkpoints", {"checkpoint_id_list": [str(painters.id)]}, key=cast["bob"]).status == 204
        assert Checkpoint.objects.filter(pk=painters.id).exists()

    def test_changing_needs_checkpoint_all_or_being_the_creator(self, api: Api, cast):
        public = cast["public"]  # visible to bob, created by admin
        assert api.put(f"checkpoints/{public.id}", {"status": "Disabled"}, key=cast["bob"]).status == 404
        assert api.put(f"checkpoints/{cast['bobs'].id}", {"status": "Disabled"}, key=cast["bob"]).status == 200
        assert api.put(f"checkpoints/{public.id}", {"status": "Disabled"}, key=cast["alice"]).status == 200

    def test_list_needs_permission(self, api: Api, outsider_key):
        answer = api.get("checkpoints", key=outsider_key)
        assert answer.body == {
            "statusCode": 403,
            "message": "User outsider has no permissions: ['checkpoint:all', 'checkpoint:list']",
        }


def test_pagination_and_order(api: Api, admin_key):
    base = timezone.now()
    for i in range(25):
        c = register(f"m{i:02d}.safetensors")
        Checkpoint.objects.filter(pk=c.pk).update(created=base - timezone.timedelta(seconds=i))
    first = api.get("checkpoints", key=admin_key, params={"page": 1, "per_page": 10}).body["data"]
    assert (first["page"], first["per_page"], first["pages"], first["total"]) == (1, 10, 3, 25)
    assert [c["name"][0] for c in first["checkpoints"]][:2] == ["m00.safetensors", "m01.safetensors"]
    last = api.get("checkpoints", key=admin_key, params={"page": 3, "per_page": 10}).body["data"]
    assert len(last["checkpoints"]) == 5
    assert api.get("checkpoints", key=admin_key, params={"page": 4}).body["data"]["checkpoints"] == []
    assert api.get("checkpoints", key=admin_key, params={"per_page": 0}).body == {
        "statusCode": 400,
        "message": "per_page must be a positive integer",
    }


def test_list_query_count_is_constant(api: Api, admin_key, designer_key):
    def count(key: str) -> int:
        api.get("ping", key=key)  # the key cache lives 1 s: fill it just before measuring (the bulk insert is slow)
        with CaptureQueriesContext(connection) as queries:
            assert api.get("checkpoints", key=key, params={"per_page": 10}).status == 200
        return len(queries)

    for key in (admin_key, designer_key):  # warm the key cache and last-used stamp
        api.get("ping", key=key)
        api.get("ping", key=key)
    for i in range(10):
        register(f"few{i}.safetensors", owners=["Designer", "byoc"])
    few_admin, few_designer = count(admin_key), count(designer_key)
    Checkpoint.objects.bulk_create(
        new_checkpoint("Lora", "admin", {}, status=CheckpointStatus.ACTIVE) for _ in range(10_000)
    )
    assert count(admin_key) == few_admin
    assert count(designer_key) == few_designer
    assert few_admin == 5  # caller's permissions, count, page, files, owners
