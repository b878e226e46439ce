"""Dataset operations (contract §9.5, §10.4). The API, the console and commands call these."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.training.models import Dataset, DatasetItem, DatasetOwner
from esd import keys
from esd.api.errors import BadRequest
from esd.api.formats import epoch_string
from esd.owners import save_owners
from esd.storage import blob_store


def create_dataset(
    *, name: str, creator: str, owners: list[str], params: dict[str, Any], prefix: str, content: list[dict]
) -> tuple[Dataset, dict[str, str]]:
    """Register a dataset and its files; returns a presigned PUT per file name."""
    if prefix:
        keys.check_segment(prefix)
    seen: set[str] = set()
    for entry in content:
        keys.check_segment(entry["filename"])
        if entry["filename"] in seen:
            raise BadRequest(f"filename {entry['filename']} is duplicated")
        seen.add(entry["filename"])
    if Dataset.objects.filter(name=name).exists():
        raise BadRequest(f"dataset {name} already exists")
    now = timezone.now()
    stamp = epoch_string(now)
    dataset = Dataset(name=name, creator=creator, params=params, prefix=prefix, created=now)
    try:
        with transaction.atomic():
            dataset.save()
            DatasetItem.objects.bulk_create(
                DatasetItem(
                    dataset=dataset,
                    key=f"{stamp}_{entry['name']}",
                    name=entry["name"],
                    filename=entry["filename"],
                    type=entry["type"],
                    params={**entry["params"], "original_file_name": entry["filename"]},
                )
                for entry in content
            )
            save_owners(DatasetOwner, dataset, owners)
    except IntegrityError:
        raise BadRequest(f"dataset {name} already exists") from None
    store = blob_store()
    expires = settings.ESD_DATASET_UPLOAD_EXPIRES
    urls = {entry["filename"]: store.presign_put(dataset.file_key(entry["filename"]), expires) for entry in content}
    return dataset, urls


def set_status(dataset: Dataset, status: str) -> None:
    """The dataset and every one of its files take the status (contract §10.4)."""
    with transaction.atomic():
        Dataset.objects.filter(pk=dataset.pk).update(status=status)
        DatasetItem.objects.filter(dataset=dataset).update(status=status)
    dataset.status = status


def delete_datasets(datasets: Iterable[Dataset]) -> int:
    """Delete the files under ``dataset/{name}/``, the items and the dataset."""
    store = blob_store()
    count = 0
    for dataset in datasets:
        store.delete_folder(keys.dataset_prefix(dataset.name))
        dataset.delete()
        count += 1
    return count
