"""The blob store: one interface over S3 (or MinIO) and the local disk, used by every app.

Clients never send model files through the API: they get presigned URLs and talk to the store directly. In ``s3``
mode those are SigV4 URLs of the bucket; in ``local`` mode (the embedded default) they point at our own signed
view (``esd.storage_views``), which behaves like S3 for PUT, GET, multipart parts and ETags, so a client written
for S3 cannot tell the difference.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote, urlencode

from botocore.exceptions import ClientError
from django.conf import settings
from django.core import signing
from django.core.files import File

if TYPE_CHECKING:
    from storages.backends.s3 import S3Storage

CHUNK = 1024 * 1024


class StorageError(Exception):
    """The store refused an operation the client shaped (bad ETag, part too small, unknown upload)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class BlobStore(ABC):
    """Operations on keys of the one bucket (``ESD_BUCKET``). Keys come from ``esd.keys`` only."""

    def __init__(self, bucket: str):
        self.bucket = bucket

    def uri(self, key: str) -> str:
        """``s3://bucket/key`` in every mode (contract §1)."""
        return f"s3://{self.bucket}/{key}"

    def key_of(self, uri: str) -> str | None:
        """The key of one of our own ``s3://`` URIs, else None."""
        prefix = f"s3://{self.bucket}/"
        return uri[len(prefix) :] if uri.startswith(prefix) and len(uri) > len(prefix) else None

    # presigned URLs -------------------------------------------------------------------------------------------
    @abstractmethod
    def presign_get(self, key: str, expires: int) -> str: ...

    @abstractmethod
    def presign_put(self, key: str, expires: int) -> str: ...

    # multipart -------------------------------------------------------------------------------------------------
    @abstractmethod
    def start_multipart(self, key: str) -> str:
        """Begin a multipart upload and return its id."""

    @abstractmethod
    def presign_part(self, key: str, upload_id: str, part_number: int, expires: int) -> str: ...

    @abstractmethod
    def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        """Server-side part upload (streaming downloads into the store); returns the part's ETag."""

    @abstractmethod
    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        """Assemble ``[{"ETag", "PartNumber"}]`` in part order; ``StorageError`` with the store's reason."""

    @abstractmethod
    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload and its parts. Never call it after a completion."""

    @abstractmethod
    def list_multipart(self) -> Iterator[tuple[str, str, float]]:
        """Every unfinished multipart upload of the bucket: ``(key, upload_id, started as a Unix time)``."""

    # objects ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def write(self, key: str, stream: BinaryIO) -> int:
        """Store everything ``stream`` yields under ``key`` (streamed, never held in memory); returns bytes."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object; ``FileNotFoundError`` when missing."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None: ...

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; missing is fine."""

    @abstractmethod
    def move(self, source: str, target: str) -> None:
        """Rename an object (copy then delete where the store cannot rename)."""

    def delete_folder(self, prefix: str) -> int:
        """Delete every object under ``prefix/`` (a folder, never a bare string prefix); returns the count."""
        count = 0
        for info in list(self.list(prefix.rstrip("/") + "/")):
            self.delete(info.key)
            count += 1
        return count

    @abstractmethod
    def check(self) -> None:
        """Raise when the store cannot be used now (``/readyz``): one cheap call, no object read."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def put_bytes(self, key: str, data: bytes) -> None:
        self.write(key, io.BytesIO(data))

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()


# --- S3 ----------------------------------------------------------------------------------------------------------


@functools.cache
def _s3_storage(bucket: str, endpoint: str | None, region: str) -> S3Storage:
    from botocore.config import Config
    from storages.backends.s3 import S3Storage

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=32,
    )
    options = {**settings.ESD_S3_OPTIONS, "bucket_name": bucket, "endpoint_url": endpoint, "region_name": region}
    return S3Storage(**options, location="", client_config=config)


class S3BlobStore(BlobStore):
    """S3 or MinIO through django-storages' ``S3Storage`` (its session, region, retries and managed uploads);
    presigned URLs and multipart calls go through its client. URLs handed to clients are signed by a second
    storage for ``S3_PUBLIC_ENDPOINT_URL``: SigV4 signs the Host header, which may differ from the one this server
    reaches (``AWS_ENDPOINT_URL``)."""

    @property
    def storage(self) -> S3Storage:
        return _s3_storage(self.bucket, settings.AWS_ENDPOINT_URL or None, settings.AWS_REGION)

    @property
    def client(self):
        return self.storage.connection.meta.client

    @property
    def signer(self):
        endpoint = settings.S3_PUBLIC_ENDPOINT_URL or settings.AWS_ENDPOINT_URL or None
        return _s3_storage(self.bucket, endpoint, settings.AWS_REGION).connection.meta.client

    def check(self) -> None:
        """The bucket answers a HEAD with our credentials (a missing bucket or a refused key raises)."""
        self.client.head_bucket(Bucket=self.bucket)

    def presign_get(self, key: str, expires: int) -> str:
        return self.signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    def presign_put(self, key: str, expires: int) -> str:
        return self.signer.generate_presigned_url(
            "put_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires
        )

    def start_multipart(self, key: str) -> str:
        return self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def presign_part(self, key: str, upload_id: str, part_number: int, expires: int) -> str:
        return self.signer.generate_presigned_url(
            "upload_part",
            Params={"Bucket": self.bucket, "Key": key, "UploadId": upload_id, "PartNumber": part_number},
            ExpiresIn=expires,
        )

    def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        answer = self.client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number, Body=data
        )
        return answer["ETag"]

    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        ordered = sorted(
            ({"ETag": p["ETag"], "PartNumber": p["PartNumber"]} for p in parts), key=lambda p: p["PartNumber"]
        )
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": ordered}
            )
        except ClientError as exc:
            raise StorageError(exc.response.get("Error", {}).get("Message") or str(exc)) from exc

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                raise

    def list_multipart(self) -> Iterator[tuple[str, str, float]]:
        pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket)
        for page in pages:
            for upload in page.get("Uploads", ()):
                yield upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()

    def write(self, key: str, stream: BinaryIO) -> int:
        counter = _CountingReader(stream)
        self.storage.save(key, File(counter, name=key))  # S3Storage's managed (multipart) upload, key as given
        return counter.count

    def open(self, key: str) -> BinaryIO:
        try:  # streamed: S3Storage.open would buffer the whole object first
            return self.storage.bucket.Object(key).get()["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(key) from exc
            raise

    def head(self, key: str) -> ObjectInfo | None:
        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return ObjectInfo(key, answer["ContentLength"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        for item in self.storage.bucket.objects.filter(Prefix=prefix):
            yield ObjectInfo(item.key, item.size)

    def delete(self, key: str) -> None:
        self.storage.delete(key)

    def delete_folder(self, prefix: str) -> int:
        keys = [info.key for info in self.list(prefix.rstrip("/") + "/")]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    def move(self, source: str, target: str) -> None:
        # The managed copy switches to multipart copy above 5 GB, where CopyObject alone would fail.
        self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target)
        self.delete(source)


class _CountingReader(io.RawIOBase):
    """Counts the bytes a stream yields while boto3 reads it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


# --- local disk --------------------------------------------------------------------------------------------------

SIGNED_PARAMS = ("X-Esd-Method", "X-Esd-Expires", "uploadId", "partNumber")


def _signature(method: str, key: str, expires: int, upload_id: str, part: str) -> str:
    message = "\n".join([method, key, str(expires), upload_id, part])
    return signing.Signer(salt="esd.storage.blob").signature(message)


class LocalBlobStore(BlobStore):
    """Objects under ``{ESD_VAR_DIR}/storage/{bucket}/{key}``; presigned URLs served by ``esd.storage_views``.

    Writes go to a temporary file in the target folder and are renamed into place, so a reader never sees half an
    object and a retried PUT simply replaces the earlier one. Multipart parts wait under ``.multipart/{id}/``.
    """

    def __init__(self, bucket: str, root: Path, public_url: str, min_part: int):
        super().__init__(bucket)
        self.root = root / bucket
        self.uploads = root / ".multipart"
        self.public_url = public_url.rstrip("/")
        self.min_part = min_part
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    def check(self) -> None:
        """The bucket's folder exists and this process may write in it."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise PermissionError(f"{self.root} is not writable")

    # paths --------------------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or "\\" in key or "\x00" in key:
            raise FileNotFoundError(key)
        return self.root.joinpath(*parts)

    def upload_dir(self, upload_id: str) -> Path:
        if not upload_id or not all(c in "0123456789abcdef" for c in upload_id):
            raise StorageError("The specified upload does not exist.")
        return self.uploads / upload_id

    def upload_key(self, upload_id: str) -> str:
        try:
            meta = json.loads((self.upload_dir(upload_id) / "upload.json").read_text())
        except FileNotFoundError:
            raise StorageError("The specified upload does not exist.") from None
        return meta["key"]

    # signed URLs --------------------------------------------------------------------------------------------
    def _signed_url(self, method: str, key: str, expires: int, upload_id: str = "", part: int | None = None) -> str:
        until = int(time.time()) + expires
        part_text = str(part) if part is not None else ""
        query = {"X-Esd-Method": method, "X-Esd-Expires": until}
        if upload_id:
            query.update({"uploadId": upload_id, "partNumber": part_text})
        query["X-Esd-Signature"] = _signature(method, key, until, upload_id, part_text)
        return f"{self.public_url}/blob/{quote(key)}?{urlencode(query)}"

    @staticmethod
    def verify(method: str, key: str, query: dict[str, str]) -> bool:
        """Whether a request carries a valid, unexpired signature for exactly this method, key and part."""
        try:
            expires = int(query.get("X-Esd-Expires", ""))
        except ValueError:
            return False
        if query.get("X-Esd-Method") != method or expires < time.time():
            return False
        expected = _signature(method, key, expires, query.get("uploadId", ""), query.get("partNumber", ""))
        return hmac.compare_digest(expected, query.get("X-Esd-Signature", ""))

    def presign_get(self, key: str, expires: int) -> str:
        return self._signed_url("GET", key, expires)

    def presign_put(self, key: str, expires: int) -> str:
        return self._signed_url("PUT", key, expires)

    def presign_part(self, key: str, upload_id: str, part_number: int, expires: int) -> str:
        return self._signed_url("PUT", key, expires, upload_id, part_number)

    # multipart ----------------------------------------------------------------------------------------------
    def start_multipart(self, key: str) -> str:
        self.path(key)
        upload_id = uuid.uuid4().hex
        folder = self.upload_dir(upload_id)
        folder.mkdir()
        (folder / "upload.json").write_text(json.dumps({"key": key}))
        return upload_id

    def receive_part(self, upload_id: str, part_number: int, stream: BinaryIO, length: int | None) -> str:
        """Store one part from a request body; returns its ETag (quoted hex MD5, as S3).

        Parts are not flushed to disk one by one: the assembled object is, on completion. The size recorded beside
        the ETag lets completion notice a part a crash left short, instead of assembling it silently.
        """
        folder = self.upload_dir(upload_id)
        if not (folder / "upload.json").exists():
            raise StorageError("The specified upload does not exist.")
        data = folder / f"{part_number:05d}.part"
        etag = _write_atomically(data, stream, length, durable=False)
        (folder / f"{part_number:05d}.etag").write_text(f"{etag} {data.stat().st_size}")
        return etag

    def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes) -> str:
        return self.receive_part(upload_id, part_number, io.BytesIO(data), len(data))

    def complete_multipart(self, key: str, upload_id: str, parts: list[dict]) -> None:
        folder = self.upload_dir(upload_id)
        if self.upload_key(upload_id) != key:
            raise StorageError("The specified upload does not exist.")
        ordered = sorted(parts, key=lambda p: p["PartNumber"])
        if not ordered:
            raise StorageError("You must specify at least one part.")
        files = []
        for index, part in enumerate(ordered):
            number = part["PartNumber"]
            data, etag_file = folder / f"{number:05d}.part", folder / f"{number:05d}.etag"
            recorded = etag_file.read_text().split() if etag_file.exists() else []
            if (
                len(recorded) != 2
                or recorded[0] != _quoted(part["ETag"])
                or not data.exists()
                or data.stat().st_size != int(recorded[1])
            ):
                raise StorageError(
                    "One or more of the specified parts could not be found. The part may not have been uploaded, "
                    "or the specified entity tag may not match the part's entity tag."
                )
            if index < len(ordered) - 1 and data.stat().st_size < self.min_part:
                raise StorageError("Your proposed upload is smaller than the minimum allowed object size.")
            files.append(data)
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                for data in files:
                    _append(out, data)
                os.fsync(out.fileno())
            os.replace(temp, target)
            _sync_dir(target.parent)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        shutil.rmtree(self.upload_dir(upload_id), ignore_errors=True)

    def list_multipart(self) -> Iterator[tuple[str, str, float]]:
        for meta in self.uploads.glob("*/upload.json"):
            try:
                key = json.loads(meta.read_text())["key"]
                started = meta.stat().st_mtime
            except (OSError, ValueError, KeyError):
                continue  # aborted or completed meanwhile
            yield key, meta.parent.name, started

    # objects ------------------------------------------------------------------------------------------------
    def write(self, key: str, stream: BinaryIO) -> int:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, stream, None)
        return target.stat().st_size

    def receive_object(self, key: str, stream: BinaryIO, length: int | None) -> str:
        """A presigned PUT of a whole object; returns its ETag."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return _write_atomically(target, stream, length)

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def head(self, key: str) -> ObjectInfo | None:
        try:
            path = self.path(key)
        except FileNotFoundError:
            return None
        return ObjectInfo(key, path.stat().st_size) if path.is_file() else None

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:
            base = self.path(folder) if folder else self.root
        except FileNotFoundError:
            return
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".upload-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield ObjectInfo(key, full.stat().st_size)

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except (FileNotFoundError, IsADirectoryError):
            return

    def delete_folder(self, prefix: str) -> int:
        try:
            folder = self.path(prefix.rstrip("/"))
        except FileNotFoundError:
            return 0
        if not folder.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(folder))
        shutil.rmtree(folder, ignore_errors=True)
        return count

    def move(self, source: str, target: str) -> None:
        destination = self.path(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path(source), destination)


def _quoted(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


def _write_atomically(target: Path, stream: BinaryIO, length: int | None, *, durable: bool = True) -> str:
    """Copy ``stream`` (``length`` bytes, or to its end) beside ``target``, then rename; returns the ETag.

    ``durable``: flush to disk before the rename, as an object store must before it acknowledges a write.
    """
    digest = hashlib.md5(usedforsecurity=False)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
    remaining = length
    try:
        with os.fdopen(handle, "wb") as out:
            while remaining is None or remaining > 0:
                chunk = stream.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
            if remaining:
                raise StorageError("The request body ended before Content-Length bytes were received.")
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, target)
        if durable:
            _sync_dir(target.parent)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return f'"{digest.hexdigest()}"'


def _append(out: BinaryIO, source: Path) -> None:
    """Append a file to ``out`` inside the kernel where possible (``copy_file_range``: no pass through Python,
    and a block-sharing reflink on XFS or btrfs); else copy in Python."""
    out.flush()
    start = out.tell()
    with source.open("rb") as part:
        size = os.fstat(part.fileno()).st_size
        try:
            done = 0
            while done < size:
                copied = os.copy_file_range(part.fileno(), out.fileno(), size - done)
                if copied == 0:
                    raise OSError("copy_file_range stopped early")
                done += copied
            out.seek(start + size)
            return
        except (AttributeError, OSError):  # not Linux, an old kernel or a filesystem that refuses
            out.seek(start)
            out.truncate()
            part.seek(0)
            shutil.copyfileobj(part, out, 8 * CHUNK)


def _sync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX needs the directory flushed too)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _store(mode: str, bucket: str, var_dir: str, public_url: str, min_part: int) -> BlobStore:
    if mode == "s3":
        return S3BlobStore(bucket)
    return LocalBlobStore(bucket, Path(var_dir) / "storage", public_url, min_part)


def blob_store() -> BlobStore:
    """The store configured by ``ESD_STORAGE`` (``local`` or ``s3``)."""
    return _store(
        settings.ESD_STORAGE,
        settings.ESD_BUCKET,
        str(settings.ESD_VAR_DIR),
        settings.ESD_PUBLIC_URL,
        settings.ESD_MULTIPART_MIN_PART_BYTES,
    )
