"""Issue 13: nothing left behind - failed and killed by-URL downloads, deleted checkpoints and abandoned client
uploads leave no multipart upload in the local store or S3 (moto)."""

import time
from io import StringIO

import pytest
from django.core.management import call_command

from apps.models_registry import services, tasks
from apps.models_registry.models import Checkpoint
from esd.storage import blob_store
from tests.conftest import Api, wait_until
from tests.models_registry.test_by_url import MiB, create, origin, private_ok  # noqa: F401
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db(transaction=True)


def uploads() -> list[tuple[str, str]]:
    return [(key, upload_id) for key, upload_id, _ in blob_store().list_multipart()]


def test_a_failed_download_aborts_its_upload(api: Api, admin_key, origin, private_ok, store, worker, settings):  # noqa: F811
    settings.ESD_CHECKPOINT_URL_MAX_BYTES = 1 * MiB
    item = create(api, admin_key, f"{origin}/files/liar.safetensors").body["data"]["checkpoints"][0]
    wait_until(lambda: Checkpoint.objects.filter(pk=item["id"], status="Disabled").first())
    assert uploads() == []


def test_a_killed_download_is_aborted_by_the_next_try_or_by_deleting_the_checkpoint(
    api: Api,
    admin_key,
    origin,  # noqa: F811
    private_ok,  # noqa: F811
    store,
    monkeypatch,
):
    item = create(api, admin_key, f"{origin}/files/model.safetensors").body["data"]["checkpoints"][0]
    checkpoint = Checkpoint.objects.get(pk=item["id"])
    key = f"{checkpoint.prefix}/model.safetensors"
    seen = {}

    def failing(*args, **kwargs):  # while the download runs, its upload is recorded on the row
        seen["row"] = Checkpoint.objects.get(pk=checkpoint.pk).open_uploads
        seen["store"] = uploads()
        raise ConnectionError("connection reset")

    monkeypatch.setattr(tasks, "open_download", failing)
    with pytest.raises(ConnectionError):
        tasks._download(checkpoint, key)
    monkeypatch.undo()
    [(recorded_key, recorded_id)] = seen["store"]
    assert recorded_key == key and seen["row"] == {"download": {"upload_id": recorded_id, "key": key, "done": False}}
    assert uploads() == []  # a failure aborts it

    # a process killed mid-download (no cleanup at all) leaves its upload recorded: the next try aborts it first
    crashed = store.start_multipart(key)
    Checkpoint.objects.filter(pk=checkpoint.pk).update(
        uploads={"download": {"upload_id": crashed, "key": key, "done": False}}
    )
    tasks._download(Checkpoint.objects.get(pk=checkpoint.pk), key)
    assert uploads() == [] and Checkpoint.objects.get(pk=checkpoint.pk).status == "Active"

    # and deleting a checkpoint whose download is still open aborts that upload too
    other = register("x.safetensors", checkpoint_type="Lora", status="Initial")
    other.source_url = f"{origin}/x"
    upload_id = store.start_multipart(f"{other.prefix}/x.safetensors")
    other.uploads = {"download": {"upload_id": upload_id, "key": f"{other.prefix}/x.safetensors", "done": False}}
    other.save()
    services.delete_checkpoints([other])
    assert uploads() == []


def test_the_sweep_aborts_only_uploads_older_than_the_limit(local_store, settings):
    store = local_store
    settings.ESD_MULTIPART_MAX_AGE_HOURS = 24
    old_id = store.start_multipart("Lora/checkpoint/custom/a/old.safetensors")
    time.sleep(2.1)  # S3 records the start to the second; it cannot be backdated, so the clock moves instead
    new_id = store.start_multipart("Lora/checkpoint/custom/b/new.safetensors")
    started = {upload_id: when for _, upload_id, when in store.list_multipart()}
    assert services.sweep_uploads() == []
    just_after_the_first = started[old_id] + 24 * 3600 + 1
    assert services.sweep_uploads(now=just_after_the_first) == [f"Lora/checkpoint/custom/a/old.safetensors ({old_id})"]
    assert uploads() == [("Lora/checkpoint/custom/b/new.safetensors", new_id)]
    out, err = StringIO(), StringIO()
    call_command("sweep_uploads", "--max-age-hours", "0", stdout=out, stderr=err)
    assert f"aborted Lora/checkpoint/custom/b/new.safetensors ({new_id})" in out.getvalue()
    assert "1 stale multipart upload(s) aborted" in err.getvalue() and uploads() == []
    assert tasks.sweep_stale_uploads.actor.actor_name.startswith("periodic_")  # runs hourly in the server


def test_the_sweep_reads_s3s_own_start_times(settings, tmp_path, moto_server):
    from tests.conftest import use_store

    store = use_store(settings, "s3", tmp_path=tmp_path, moto_url=moto_server)
    try:
        first = store.start_multipart("Lora/checkpoint/custom/a/x.safetensors")
        [(_, _, started)] = store.list_multipart()  # moto reports a fixed start time in 2010
        assert services.sweep_uploads(now=started + 23 * 3600) == []
        assert services.sweep_uploads(now=started + 25 * 3600) == [f"Lora/checkpoint/custom/a/x.safetensors ({first})"]
        assert list(store.list_multipart()) == []
    finally:
        from esd.aws import reset_clients
        from esd.storage import _store

        _store.cache_clear()
        reset_clients()
