"""The blob store behaves the same in both modes, over real HTTP: S3 on moto, local behind the live server."""

import hashlib
import os
import time
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import requests

from esd.storage import LocalBlobStore, StorageError

MiB = 1024 * 1024

pytestmark = pytest.mark.django_db


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def test_presigned_put_then_get(store):
    data = os.urandom(300_000)
    put = requests.put(store.presign_put("txt2img/infer_v2/j1/api_param.json", 60), data=data, timeout=30)
    assert put.status_code == 200
    assert put.headers["ETag"] == md5_etag(data)
    got = requests.get(store.presign_get("txt2img/infer_v2/j1/api_param.json", 60), timeout=30)
    assert got.status_code == 200 and got.content == data
    assert store.head("txt2img/infer_v2/j1/api_param.json").size == len(data)
    assert store.read_bytes("txt2img/infer_v2/j1/api_param.json") == data


def test_multipart_upload_through_part_urls(store):
    key = "Stable-diffusion/checkpoint/custom/abc/v1.safetensors"
    chunks = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(1234)]
    upload_id = store.start_multipart(key)
    tags = []
    for number, chunk in enumerate(chunks, start=1):
        answer = requests.put(store.presign_part(key, upload_id, number, 600), data=chunk, timeout=60)
        assert answer.status_code == 200
        assert answer.headers["ETag"] == md5_etag(chunk)
        tags.append({"ETag": answer.headers["ETag"], "PartNumber": number})
    store.complete_multipart(key, upload_id, list(reversed(tags)))  # completion sorts by part number
    body = requests.get(store.presign_get(key, 60), timeout=60).content
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(chunks)).digest()
    ranged = requests.get(store.presign_get(key, 60), headers={"Range": "bytes=10-19"}, timeout=30)
    assert ranged.status_code == 206 and ranged.content == chunks[0][10:20]


def test_retried_part_replaces_the_first_attempt(store):
    key = "Lora/checkpoint/custom/abc/x.safetensors"
    upload_id = store.start_multipart(key)
    url = store.presign_part(key, upload_id, 1, 600)
    requests.put(url, data=b"first attempt", timeout=30)
    etag = requests.put(url, data=b"second attempt", timeout=30).headers["ETag"]
    store.complete_multipart(key, upload_id, [{"ETag": etag, "PartNumber": 1}])
    assert store.read_bytes(key) == b"second attempt"


def test_wrong_etag_is_refused(store):
    key = "Lora/checkpoint/custom/abc/y.safetensors"
    upload_id = store.start_multipart(key)
    requests.put(store.presign_part(key, upload_id, 1, 600), data=b"data", timeout=30)
    with pytest.raises(StorageError):
        store.complete_multipart(key, upload_id, [{"ETag": '"0123456789abcdef0123456789abcdef"', "PartNumber": 1}])
    assert not store.exists(key)


def test_small_middle_part_is_refused(store):
    key = "Lora/checkpoint/custom/abc/z.safetensors"
    upload_id = store.start_multipart(key)
    tags = []
    for number, chunk in enumerate([b"tiny", b"also tiny"], start=1):
        etag = requests.put(store.presign_part(key, upload_id, number, 600), data=chunk, timeout=30).headers["ETag"]
        tags.append({"ETag": etag, "PartNumber": number})
    with pytest.raises(StorageError):
        store.complete_multipart(key, upload_id, tags)


def test_server_side_parts_write_open_list_move_delete(store):
    key = "dataset/lego/a.png"
    upload_id = store.start_multipart(key)
    first = os.urandom(5 * MiB)
    tags = [
        {"ETag": store.upload_part(key, upload_id, 1, first), "PartNumber": 1},
        {"ETag": store.upload_part(key, upload_id, 2, b"tail"), "PartNumber": 2},
    ]
    store.complete_multipart(key, upload_id, tags)
    assert store.read_bytes(key) == first + b"tail"
    store.put_bytes("dataset/lego/b.txt", b"caption")
    store.put_bytes("dataset/legolas/c.txt", b"other folder")
    assert sorted(i.key for i in store.list("dataset/lego/")) == ["dataset/lego/a.png", "dataset/lego/b.txt"]
    store.move("dataset/lego/b.txt", "dataset/lego/renamed.txt")
    assert not store.exists("dataset/lego/b.txt") and store.read_bytes("dataset/lego/renamed.txt") == b"caption"
    assert store.delete_folder("dataset/lego") == 2
    assert list(store.list("dataset/lego/")) == []
    assert store.exists("dataset/legolas/c.txt")  # a folder, not a string prefix
    with pytest.raises(FileNotFoundError):
        store.open("dataset/lego/a.png")
    assert store.head("dataset/lego/a.png") is None


def test_abort_drops_the_upload(store):
    key = "Lora/checkpoint/custom/abc/w.safetensors"
    upload_id = store.start_multipart(key)
    store.upload_part(key, upload_id, 1, b"x")
    store.abort_multipart(key, upload_id)
    store.abort_multipart(key, upload_id)  # twice is fine
    with pytest.raises(StorageError):
        store.complete_multipart(key, upload_id, [{"ETag": md5_etag(b"x"), "PartNumber": 1}])


def test_uri_round_trip(store, settings):
    assert store.uri("a/b.txt") == f"s3://{settings.ESD_BUCKET}/a/b.txt"
    assert store.key_of(f"s3://{settings.ESD_BUCKET}/a/b.txt") == "a/b.txt"
    assert store.key_of("s3://other/a/b.txt") is None


class TestLocalSignatures:
    """Moto does not check signatures; the local store must, exactly as S3 does."""

    def tampered(self, url: str, **changes: str) -> str:
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        query.update(changes)
        return urlunsplit(parts._replace(query=urlencode(query)))

    def test_signature_binds_method_key_part_and_expiry(self, local_store: LocalBlobStore):
        key = "Lora/checkpoint/custom/abc/s.safetensors"
        local_store.put_bytes(key, b"secret")
        get_url = local_store.presign_get(key, 60)
        assert requests.get(get_url, timeout=10).content == b"secret"
        assert requests.put(get_url, data=b"overwrite", timeout=10).status_code == 403  # GET URL cannot PUT
        other_key = get_url.replace("s.safetensors", "t.safetensors")
        assert requests.get(other_key, timeout=10).status_code == 403
        assert (
            requests.get(
                self.tampered(get_url, **{"X-Esd-Expires": str(int(time.time()) + 9999)}), timeout=10
            ).status_code
            == 403
        )
        upload_id = local_store.start_multipart(key)
        part_url = local_store.presign_part(key, upload_id, 1, 60)
        assert requests.put(self.tampered(part_url, partNumber="2"), data=b"x", timeout=10).status_code == 403
        expired = local_store.presign_get(key, -1)
        denied = requests.get(expired, timeout=10)
        assert denied.status_code == 403 and b"AccessDenied" in denied.content
        assert local_store.read_bytes(key) == b"secret"

    def test_browser_preflight_exposes_the_etag(self, local_store: LocalBlobStore):
        url = local_store.presign_put("dataset/x/y.png", 60)
        preflight = requests.options(url, timeout=10)
        assert preflight.status_code == 200
        assert "ETag" in preflight.headers["Access-Control-Expose-Headers"]
        put = requests.put(url, data=b"png", timeout=10)
        assert put.headers["Access-Control-Allow-Origin"] == "*"

    def test_head_and_suffix_range(self, local_store: LocalBlobStore):
        local_store.put_bytes("a/b.bin", b"0123456789")
        url = local_store.presign_get("a/b.bin", 60)
        head = requests.head(url, timeout=10)
        assert head.status_code == 200 and head.headers["Content-Length"] == "10" and head.content == b""
        assert head.headers["Content-Security-Policy"] == "sandbox"  # uploaded HTML cannot act as our origin
        tail = requests.get(url, headers={"Range": "bytes=-3"}, timeout=10)
        assert (tail.status_code, tail.content, tail.headers["Content-Range"]) == (206, b"789", "bytes 7-9/10")
        assert requests.get(url, headers={"Range": "bytes=50-"}, timeout=10).status_code == 416

    def test_keys_cannot_escape_the_bucket(self, local_store: LocalBlobStore):
        with pytest.raises(FileNotFoundError):
            local_store.path("../outside")
        with pytest.raises(FileNotFoundError):
            local_store.path("a//b")


def test_setup_storage_creates_the_bucket_with_cors(settings, tmp_path, moto_server):
    from io import StringIO

    from django.core.management import call_command

    from esd.aws import client
    from tests.conftest import use_store

    store = use_store(settings, "s3", tmp_path=tmp_path, moto_url=moto_server)
    settings.ESD_BUCKET = store.bucket + "-new"
    from esd.storage import _store

    _store.cache_clear()
    out = StringIO()
    call_command("setup_storage", stdout=out)
    call_command("setup_storage", stdout=out)  # twice is fine
    assert f"created bucket {settings.ESD_BUCKET}" in out.getvalue()
    rules = client("s3").get_bucket_cors(Bucket=settings.ESD_BUCKET)["CORSRules"]
    assert rules[0]["ExposeHeaders"] == ["ETag"]
    _store.cache_clear()


def test_a_part_left_short_by_a_crash_is_not_assembled(local_store: LocalBlobStore):
    key = "Lora/checkpoint/custom/abc/crash.safetensors"
    upload_id = local_store.start_multipart(key)
    etag = local_store.upload_part(key, upload_id, 1, b"complete part data")
    part = local_store.upload_dir(upload_id) / "00001.part"
    part.write_bytes(b"")  # what delayed allocation can leave after a power cut
    with pytest.raises(StorageError):
        local_store.complete_multipart(key, upload_id, [{"ETag": etag, "PartNumber": 1}])
    assert not local_store.exists(key)


@pytest.mark.parametrize("store", ["s3"], indirect=True)
def test_s3_mode_does_object_io_through_django_storages(store):
    """One S3 configuration: the blob store's objects are django-storages' S3Storage objects, so Django's own
    storage API reads what the store wrote, and the presigned URLs come from that storage's client."""
    from storages.backends.s3 import S3Storage

    assert isinstance(store.storage, S3Storage)
    store.put_bytes("embeddings/checkpoint/custom/x/a.pt", b"tensor bytes")
    with store.storage.open("embeddings/checkpoint/custom/x/a.pt", "rb") as handle:
        assert handle.read() == b"tensor bytes"
    assert store.storage.size("embeddings/checkpoint/custom/x/a.pt") == len(b"tensor bytes")
    assert store.client is store.storage.connection.meta.client
    store.delete("embeddings/checkpoint/custom/x/a.pt")
    assert not store.storage.exists("embeddings/checkpoint/custom/x/a.pt")
