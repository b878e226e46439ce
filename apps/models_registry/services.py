"""Checkpoint operations (contract §9.4, §10.1). The API, the console, commands and actors all call these."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from apps.models_registry.choices import URL_EXTENSIONS, CheckpointStatus
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from esd import keys
from esd.api.errors import BadRequest
from esd.fetch import Guard, Probe, UrlNotAllowed, UrlNotReachable, probe
from esd.owners import save_owners
from esd.storage import StorageError, blob_store
from esd.tasks import enqueue

log = logging.getLogger(__name__)


def already_exists(name: str) -> BadRequest:
    return BadRequest(f"{name} already exists, please use another or rename/delete exists")


def check_new_names(names: list[str]) -> None:
    """Each name one path segment, unique in the request and among all checkpoint names."""
    seen: set[str] = set()
    for name in names:
        keys.check_segment(name)
        if name in seen:
            raise already_exists(name)
        seen.add(name)
    taken = CheckpointFile.objects.filter(name__in=names).values_list("name", flat=True).first()
    if taken is not None:
        raise already_exists(taken)


def _register(checkpoint: Checkpoint, names: list[str], owners: Iterable[str]) -> None:
    """Save the row with its names and owners; a name taken meanwhile (a concurrent request) is the same 400."""
    try:
        with transaction.atomic():
            checkpoint.save()
            CheckpointFile.objects.bulk_create(
                CheckpointFile(checkpoint=checkpoint, position=i, name=name) for i, name in enumerate(names)
            )
            save_owners(CheckpointOwner, checkpoint, owners)
    except IntegrityError:
        taken = CheckpointFile.objects.filter(name__in=names).values_list("name", flat=True).first()
        raise already_exists(taken or names[0]) from None


def new_checkpoint(checkpoint_type: str, creator: str, params: dict[str, Any], **fields: Any) -> Checkpoint:
    checkpoint = Checkpoint(checkpoint_type=checkpoint_type, creator=creator, params=params, **fields)
    if not checkpoint.prefix:
        checkpoint.prefix = keys.checkpoint_prefix(checkpoint_type, str(checkpoint.id))
    return checkpoint


# --- multipart upload --------------------------------------------------------------------------------------------


def create_multipart(
    *, checkpoint_type: str, creator: str, owners: list[str], params: dict[str, Any], files: list[dict]
) -> tuple[Checkpoint, dict[str, list[str]]]:
    """Register a checkpoint whose files the client uploads in parts; returns the part URLs per file."""
    names = [f["filename"] for f in files]
    check_new_names(names)
    checkpoint = new_checkpoint(checkpoint_type, creator, params)
    store = blob_store()
    expires = settings.ESD_UPLOAD_PART_EXPIRES
    urls: dict[str, list[str]] = {}
    try:
        for f in files:
            key = keys.in_prefix(checkpoint.prefix, f["filename"])
            upload_id = store.start_multipart(key)
            checkpoint.uploads[f["filename"]] = {"upload_id": upload_id, "key": key, "done": False}
            urls[f["filename"]] = [
                store.presign_part(key, upload_id, n, expires) for n in range(1, f["parts_number"] + 1)
            ]
        _register(checkpoint, names, owners)
    except BaseException:
        for info in checkpoint.uploads.values():
            store.abort_multipart(info["key"], info["upload_id"])
        raise
    return checkpoint, urls


def complete_uploads(checkpoint: Checkpoint, status: str, tags: dict[str, list[dict]] | None) -> None:
    """``PUT status=Active`` while uploads are open: complete each (never abort after), then activate.

    Each file is marked done as soon as storage accepted it, so a retry after a refused part finishes the rest.
    """
    pending = checkpoint.open_uploads
    if checkpoint.source_url:  # its one upload is the server's own download, completed by the server
        raise BadRequest(f"checkpoint {checkpoint.pk} is downloaded from its URL by the server")
    if not tags:
        raise BadRequest("multi parts tags is empty")
    if status != CheckpointStatus.ACTIVE:
        raise BadRequest(f"checkpoint status can not be changed from {checkpoint.status} to {status}")
    missing = next((name for name in pending if name not in tags), None)
    if missing is not None:
        raise BadRequest(f"multi parts tags of {missing} is missing")
    store = blob_store()
    for name, info in pending.items():
        if not store.exists(info["key"]):  # already assembled by an earlier attempt that failed to record it
            try:
                store.complete_multipart(info["key"], info["upload_id"], tags[name])
            except StorageError as exc:
                raise BadRequest(f"failed to complete multipart upload of {name}: {exc}") from exc
        info["done"] = True
        Checkpoint.objects.filter(pk=checkpoint.pk).update(uploads=checkpoint.uploads)
    set_status(checkpoint, CheckpointStatus.ACTIVE)


# --- status ------------------------------------------------------------------------------------------------------

_MANUAL = {CheckpointStatus.ACTIVE, CheckpointStatus.DISABLED}


def change_status(checkpoint: Checkpoint, status: str) -> None:
    """``PUT status`` with no open uploads: ``Active`` and ``Disabled`` swap; the same status is a no-op."""
    if status == checkpoint.status:
        return
    if {checkpoint.status, status} != _MANUAL:
        raise BadRequest(f"checkpoint status can not be changed from {checkpoint.status} to {status}")
    set_status(checkpoint, status)


def set_status(checkpoint: Checkpoint, status: str, error: str = "") -> None:
    """The one place a checkpoint's status changes (contract §10.1)."""
    checkpoint.status = status
    fields = ["status", "updated"]
    if error:
        checkpoint.error = error
        fields.append("error")
    checkpoint.save(update_fields=fields)


# --- by URL --------------------------------------------------------------------------------------------------------


def url_guard() -> Guard:
    return Guard(
        allow_private=settings.ESD_CHECKPOINT_URL_ALLOW_PRIVATE,
        allowed_networks=tuple(settings.ESD_CHECKPOINT_URL_ALLOWED_NETWORKS),
    )


def probe_url(url: str) -> Probe:
    """Contract §9.4 by URL, steps 1-4: allowed address, reachable, a model file name, not too large."""
    try:
        found = probe(url, url_guard())
    except UrlNotAllowed:
        raise BadRequest(f"url {url} is not allowed") from None
    except UrlNotReachable:
        raise BadRequest(f"url {url} is not reachable") from None
    if not found.name.lower().endswith(URL_EXTENSIONS):
        raise BadRequest(f"file {found.name} from url {url} has an unsupported extension")
    if found.size is not None and found.size > settings.ESD_CHECKPOINT_URL_MAX_BYTES:
        raise BadRequest(f"url {url} is too large")
    return found


def create_from_urls(
    *, checkpoint_type: str, creator: str, owners: list[str], params: dict[str, Any], urls: list[str]
) -> list[Checkpoint]:
    """One ``Initial`` row per URL (reserving its name at once) and a download job each."""
    probes = [probe_url(url) for url in dict.fromkeys(urls)]
    names = [p.name for p in probes]
    check_new_names(names)
    checkpoints = []
    with transaction.atomic():
        for found in probes:
            checkpoint = new_checkpoint(
                checkpoint_type, creator, params, source_url=found.final_url, bytes_total=found.size
            )
            _register(checkpoint, [found.name], owners)
            enqueue("apps.models_registry.tasks.download_checkpoint", str(checkpoint.id))
            checkpoints.append(checkpoint)
    return checkpoints


# --- rename and delete ---------------------------------------------------------------------------------------------


def request_rename(checkpoint: Checkpoint, name: str) -> bool:
    """``PUT name``: False when nothing is to do; else a rename job is queued."""
    if checkpoint.status != CheckpointStatus.ACTIVE:
        raise BadRequest("only active can update name")
    first = checkpoint.files.first()
    if first is not None and first.name == name:
        return False
    if CheckpointFile.objects.filter(name=name).exists():
        raise already_exists(name)
    enqueue("apps.models_registry.tasks.rename_checkpoint", str(checkpoint.id), name)
    return True


def rename(checkpoint: Checkpoint, name: str) -> None:
    """Move the first file to ``{prefix}/{name}`` and record the new name (the rename job's work)."""
    first = checkpoint.files.first()
    if first is None or first.name == name:
        return
    store = blob_store()
    source, target = keys.in_prefix(checkpoint.prefix, first.name), keys.in_prefix(checkpoint.prefix, name)
    if store.exists(source):
        store.move(source, target)
    elif not store.exists(target):
        raise FileNotFoundError(source)
    try:
        with transaction.atomic():
            CheckpointFile.objects.filter(pk=first.pk).update(name=name)
    except IntegrityError:
        store.move(target, source)  # someone took the name meanwhile: leave everything as it was
        raise BadRequest(f"{name} already exists, please use another or rename/delete exists") from None


def sweep_uploads(max_age_hours: float | None = None, now: float | None = None) -> list[str]:
    """Abort every multipart upload older than ``ESD_MULTIPART_MAX_AGE_HOURS`` (clients that never completed,
    downloads killed mid-way): their parts cost storage and nothing will ever finish them. Returns what was
    aborted, as ``key (upload id)``."""
    import time

    hours = settings.ESD_MULTIPART_MAX_AGE_HOURS if max_age_hours is None else max_age_hours
    cutoff = (time.time() if now is None else now) - hours * 3600
    store = blob_store()
    aborted = []
    for key, upload_id, started in list(store.list_multipart()):
        if started < cutoff:
            store.abort_multipart(key, upload_id)
            aborted.append(f"{key} ({upload_id})")
    return aborted


def delete_checkpoints(checkpoints: Iterable[Checkpoint]) -> int:
    """Abort open uploads, delete every object under the checkpoint's folder, delete the row."""
    store = blob_store()
    count = 0
    for checkpoint in checkpoints:
        for info in checkpoint.open_uploads.values():
            store.abort_multipart(info["key"], info["upload_id"])
        store.delete_folder(checkpoint.prefix)
        checkpoint.delete()
        count += 1
    return count


# --- import --------------------------------------------------------------------------------------------------------


def import_file(
    path: Path, *, checkpoint_type: str, owners: list[str], creator: str = "ESD", params: dict[str, Any] | None = None
) -> Checkpoint:
    """Register a local file as an ``Active`` checkpoint, streaming it into the blob store."""
    name = path.name
    check_new_names([name])
    checkpoint = new_checkpoint(checkpoint_type, creator, params or {}, status=CheckpointStatus.INITIAL)
    _register(checkpoint, [name], owners)
    try:
        with path.open("rb") as stream:
            size = blob_store().write(keys.in_prefix(checkpoint.prefix, name), stream)
    except BaseException:
        delete_checkpoints([checkpoint])
        raise
    Checkpoint.objects.filter(pk=checkpoint.pk).update(bytes_done=size, bytes_total=size)
    set_status(checkpoint, CheckpointStatus.ACTIVE)
    return checkpoint
