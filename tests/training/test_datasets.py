"""Contract §9.5 and §11 (dataset flow): create, upload through the presigned URLs, enable, read, delete."""

import os

import pytest
import requests

from apps.training.models import Dataset, DatasetItem
from tests.conftest import Api, make_key, make_role, make_user

pytestmark = pytest.mark.django_db


def body(name="lego", prefix="10_technic", files=("1.png", "1.txt")):
    return {
        "dataset_name": name,
        "content": [
            {
                "filename": f,
                "name": f,
                "type": "image" if f.endswith(".png") else "text",
                "params": {"caption": f == "1.txt"},
            }
            for f in files
        ],
        "params": {"description": "bricks", "status": "client must not win"},
        "creator": "ignored",
        "prefix": prefix,
    }


def test_dataset_flow(api: Api, admin_key, store, settings):
    created = api.post("datasets", body(), key=admin_key)
    assert created.status == 201, created.body
    urls = created.body["data"]["s3PresignUrl"]
    assert created.body["data"]["datasetName"] == "lego" and set(urls) == {"1.png", "1.txt"}
    image, caption = os.urandom(40_000), b"a lego technic car"
    assert requests.put(urls["1.png"], data=image, timeout=30).status_code == 200
    assert requests.put(urls["1.txt"], data=caption, timeout=30).status_code == 200
    assert store.read_bytes("dataset/lego/10_technic/1.png") == image

    enabled = api.put("datasets/lego", {"status": "Enabled"}, key=admin_key)
    assert enabled.body == {"statusCode": 200, "data": {"datasetName": "lego", "status": "Enabled"}, "message": "OK"}
    assert set(DatasetItem.objects.values_list("status", flat=True)) == {"Enabled"}

    detail = api.get("datasets/lego", key=admin_key).body["data"]
    s3 = f"s3://{settings.ESD_BUCKET}/dataset/lego/10_technic"
    assert {k: detail[k] for k in ("dataset_name", "datasetName", "prefix", "s3", "status", "description")} == {
        "dataset_name": "lego",
        "datasetName": "lego",
        "prefix": "10_technic",
        "s3": s3,
        "status": "Enabled",
        "description": "bricks",
    }
    files = {f["original_file_name"]: f for f in detail["data"]}
    assert files["1.txt"]["dataStatus"] == "Enabled" and files["1.txt"]["caption"] is True
    assert files["1.png"]["type"] == "image" and files["1.png"]["key"].endswith("_1.png")
    assert requests.get(files["1.png"]["preview_url"], timeout=30).content == image

    listed = api.get("datasets", key=admin_key).body["data"]
    assert listed["last_evaluated_key"] is None
    [item] = listed["datasets"]
    assert item["datasetName"] == "lego" and item["s3"] == s3
    assert item["status"] == "Enabled"  # fixed keys win over the client's params
    assert item["description"] == "bricks"

    assert api.delete("datasets", {"dataset_name_list": ["lego"]}, key=admin_key).status == 204
    assert not Dataset.objects.exists() and not DatasetItem.objects.exists()
    assert list(store.list("dataset/lego/")) == []


def test_create_rules(api: Api, admin_key, disk_store):
    assert api.post("datasets", body(prefix=""), key=admin_key).status == 201
    assert api.post("datasets", body(), key=admin_key).body == {
        "statusCode": 400,
        "message": "dataset lego already exists",
    }
    bad_prefix = api.post("datasets", body(name="other", prefix="a/b"), key=admin_key)
    assert bad_prefix.body == {"statusCode": 400, "message": "filename a/b is not allowed"}
    bad_file = api.post("datasets", body(name="other", files=("..",)), key=admin_key)
    assert bad_file.body == {"statusCode": 400, "message": "filename .. is not allowed"}
    twice = api.post("datasets", body(name="other", files=("a.png", "a.png")), key=admin_key)
    assert twice.body == {"statusCode": 400, "message": "filename a.png is duplicated"}
    assert list(Dataset.objects.values_list("name", flat=True)) == ["lego"]


def test_no_prefix_puts_files_at_the_dataset_root(api: Api, admin_key, disk_store):
    urls = api.post("datasets", body(prefix=""), key=admin_key).body["data"]["s3PresignUrl"]
    assert "/blob/dataset/lego/1.png?" in urls["1.png"]


@pytest.mark.parametrize(
    ("patch", "errors"),
    [
        (
            {"dataset_name": "1lego"},
            {"dataset_name": ['ECMA 262 regex "^[A-Za-z][A-Za-z0-9_-]*$" does not match input string "1lego"']},
        ),
        (
            {"dataset_name": "x" * 21},
            {"dataset_name": [f'string "{"x" * 21}" is too long (length: 21, allowed maximum: 20)']},
        ),
        (
            {"content": []},
            {"content": ["array is too short: must have at least 1 elements but instance has 0 elements"]},
        ),
        (
            {"creator": None},
            {"creator": ['instance type (null) does not match any allowed primitive type (allowed: ["string"])']},
        ),
    ],
)
def test_create_validation(api: Api, admin_key, patch, errors):
    answer = api.post("datasets", {**body(), **patch}, key=admin_key)
    assert answer.status == 400 and answer.body["errors"] == errors


def test_unknown_dataset_is_404(api: Api, admin_key):
    assert api.get("datasets/nope", key=admin_key).body == {"statusCode": 404, "message": "dataset nope is not found"}
    assert api.put("datasets/nope", {"status": "Enabled"}, key=admin_key).status == 404


def test_status_filter_and_keyset_pages(api: Api, admin_key, disk_store):
    for i in range(5):
        api.post("datasets", body(name=f"set{i}"), key=admin_key)
    api.put("datasets/set1", {"status": "Disabled"}, key=admin_key)
    first = api.get("datasets", key=admin_key, params={"limit": 2}).body["data"]
    assert [d["datasetName"] for d in first["datasets"]] == ["set4", "set3"]
    second = api.get(
        "datasets", key=admin_key, params={"limit": 2, "exclusive_start_key": first["last_evaluated_key"]}
    ).body["data"]
    assert [d["datasetName"] for d in second["datasets"]] == ["set2", "set1"]
    disabled = api.get("datasets", key=admin_key, params={"dataset_status": "Disabled"}).body["data"]
    assert [d["datasetName"] for d in disabled["datasets"]] == ["set1"]
    bad = api.get("datasets", key=admin_key, params={"exclusive_start_key": "garbage"})
    assert bad.body == {"statusCode": 400, "message": "exclusive_start_key is invalid"}


def test_visibility_by_role(api: Api, admin_key, disk_store):
    make_role("Painters", ["train:all"])
    make_role("Sculptors", ["train:all"])
    alice = make_key(make_user("alice", roles=("Painters",)))
    bob = make_key(make_user("bob", roles=("Sculptors",)))
    assert api.post("datasets", body(name="alices"), key=alice).status == 201
    assert [d["datasetName"] for d in api.get("datasets", key=alice).body["data"]["datasets"]] == ["alices"]
    assert api.get("datasets", key=bob).body["data"]["datasets"] == []
    assert api.get("datasets/alices", key=bob).status == 404
    assert api.delete("datasets", {"dataset_name_list": ["alices"]}, key=bob).status == 204
    assert Dataset.objects.filter(name="alices").exists()
    assert [d["datasetName"] for d in api.get("datasets", key=admin_key).body["data"]["datasets"]] == ["alices"]


def test_every_dataset_route_needs_train_all(api: Api, designer_key, outsider_key):
    message = "User outsider has no permissions: ['train:all']"
    assert api.get("datasets", key=outsider_key).body == {"statusCode": 403, "message": message}
    assert api.get("datasets/x", key=outsider_key).body == {"statusCode": 403, "message": message}
    assert api.post("datasets", body(), key=outsider_key).status == 403
    assert api.get("datasets", key=designer_key).status == 200
