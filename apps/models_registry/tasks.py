"""Checkpoint actors: download by URL and rename. Both take ids and are safe to run twice."""

from __future__ import annotations

import logging

import dramatiq
from django.conf import settings
from dramatiq.middleware import CurrentMessage

from apps.models_registry import services
from apps.models_registry.choices import CheckpointStatus
from apps.models_registry.models import Checkpoint
from esd import keys
from esd.api.errors import BadRequest
from esd.fetch import UrlNotAllowed, UrlNotReachable, open_download
from esd.storage import blob_store
from esd.tasks import periodic, recoverer

log = logging.getLogger(__name__)

PART_BYTES = 64 * 1024 * 1024
DOWNLOAD_TRIES = 3


class TooLarge(Exception):
    """The body grew past ESD_CHECKPOINT_URL_MAX_BYTES: retrying cannot help."""


def _attempt() -> int:
    message = CurrentMessage.get_current_message()
    return (message.options.get("retries", 0) if message else 0) + 1


@dramatiq.actor(max_retries=DOWNLOAD_TRIES - 1, min_backoff=5_000, max_backoff=60_000, time_limit=6 * 3600 * 1000)
def download_checkpoint(checkpoint_id: str) -> None:
    """Stream a URL into the blob store in parts; Active on success, Disabled with the error after 3 tries.

    The file never sits whole in memory or on a web host: each 64 MiB part goes to the store as it arrives, and
    progress is written to the row after every part.
    """
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id, status=CheckpointStatus.INITIAL).first()
    if checkpoint is None or not checkpoint.source_url:
        return  # already finished, deleted, or not a download
    name = checkpoint.files.values_list("name", flat=True).first()
    try:
        _download(checkpoint, keys.in_prefix(checkpoint.prefix, name))
    except TooLarge:
        _fail(checkpoint, f"the file is larger than {settings.ESD_CHECKPOINT_URL_MAX_BYTES} bytes")
    except Exception as exc:
        attempt = _attempt()
        log.warning("download of checkpoint %s failed (try %s of %s): %s", checkpoint_id, attempt, DOWNLOAD_TRIES, exc)
        if attempt >= DOWNLOAD_TRIES:
            _fail(checkpoint, f"download failed after {DOWNLOAD_TRIES} tries: {_reason(exc)}")
            return
        raise


def _reason(exc: Exception) -> str:
    if isinstance(exc, UrlNotAllowed):
        return "the URL now resolves to an address that is not allowed"
    if isinstance(exc, UrlNotReachable):
        return "the URL is not reachable"
    return str(exc) or type(exc).__name__


def _download(checkpoint: Checkpoint, key: str) -> None:
    store = blob_store()
    cap = settings.ESD_CHECKPOINT_URL_MAX_BYTES
    for info in checkpoint.open_uploads.values():  # a try that was killed: its parts go before the next starts
        store.abort_multipart(info["key"], info["upload_id"])
    upload_id = store.start_multipart(key)
    # recorded on the row, so that deleting the checkpoint mid-download aborts it (delete_checkpoints)
    checkpoint.uploads = {"download": {"upload_id": upload_id, "key": key, "done": False}}
    Checkpoint.objects.filter(pk=checkpoint.pk).update(uploads=checkpoint.uploads)
    try:
        with open_download(checkpoint.source_url, services.url_guard()) as body:
            if body.size is not None and body.size > cap:
                raise TooLarge
            Checkpoint.objects.filter(pk=checkpoint.pk).update(bytes_total=body.size, bytes_done=0)
            parts, done, number = [], 0, 1
            while True:
                chunk = _read_part(body, PART_BYTES)
                if not chunk and parts:
                    break
                done += len(chunk)
                if done > cap:
                    raise TooLarge
                parts.append({"ETag": store.upload_part(key, upload_id, number, chunk), "PartNumber": number})
                Checkpoint.objects.filter(pk=checkpoint.pk).update(bytes_done=done)
                number += 1
                if len(chunk) < PART_BYTES:
                    break
        store.complete_multipart(key, upload_id, parts)
    except BaseException:
        store.abort_multipart(key, upload_id)
        Checkpoint.objects.filter(pk=checkpoint.pk).update(uploads={})
        raise
    Checkpoint.objects.filter(pk=checkpoint.pk).update(uploads={})
    if not Checkpoint.objects.filter(pk=checkpoint.pk).exists():
        store.delete(key)  # deleted while downloading
        return
    services.set_status(checkpoint, CheckpointStatus.ACTIVE)


def _read_part(body, size: int) -> bytes:
    """Exactly ``size`` bytes unless the body ends first (network reads return less than asked)."""
    pieces, remaining = [], size
    while remaining:
        piece = body.read(min(remaining, 1024 * 1024))
        if not piece:
            break
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


def _fail(checkpoint: Checkpoint, error: str) -> None:
    blob_store().delete_folder(checkpoint.prefix)
    services.set_status(checkpoint, CheckpointStatus.DISABLED, error=error)


@dramatiq.actor(max_retries=3, min_backoff=2_000, time_limit=3600 * 1000)
def rename_checkpoint(checkpoint_id: str, name: str) -> None:
    """Give the first file a new name (object move, then the row); nothing happens twice."""
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id).first()
    if checkpoint is None:
        return
    try:
        services.rename(checkpoint, name)
    except BadRequest as exc:  # the name was taken after the request was accepted: nothing to retry
        log.warning("rename of checkpoint %s to %s refused: %s", checkpoint_id, name, exc.message)


def sweep_uploads_interval() -> int:
    return 3600


@periodic(sweep_uploads_interval)
def sweep_stale_uploads() -> None:
    """Hourly: abort multipart uploads older than ESD_MULTIPART_MAX_AGE_HOURS (``manage.py sweep_uploads``)."""
    aborted = services.sweep_uploads()
    if aborted:
        log.info("aborted %d stale multipart upload(s): %s", len(aborted), ", ".join(aborted))


@recoverer("checkpoint downloads")
def recover_downloads() -> int:
    """Downloads still Initial were cut short by a restart: start them again (each starts from byte 0)."""
    pending = list(
        Checkpoint.objects.filter(status=CheckpointStatus.INITIAL).exclude(source_url="").values_list("pk", flat=True)
    )
    for checkpoint_id in pending:
        download_checkpoint.send(str(checkpoint_id))
    return len(pending)
