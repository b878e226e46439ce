"""Every HTTP transfer the runtime makes: job parameters, model and dataset files, outputs, cancel polls.

Why one module: a GPU host reaches storage only through presigned URLs, and every one of those transfers must
behave the same under faults - bounded timeouts, retries with backoff on connection errors, 5xx and 429 for the
idempotent GET and PUT, size checks on downloads, and a :class:`~gpu_runtime.errors.JobError` whose text names
what failed (it becomes the job's failure reason). It is built on one module-level urllib3 ``PoolManager`` so
connections to the same storage host are reused across jobs and threads. Only ``http(s)://`` (and ``s3://`` where
a caller allows it, read with the container's own IAM role through boto3) is ever opened: a job message must never
make the worker read local files.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import MaxRetryError
from urllib3.util import Retry, Timeout

from gpu_runtime.errors import JobError

log = logging.getLogger(__name__)

__all__ = ["check_url", "download", "download_file", "get_bytes", "put", "status_of"]

ATTEMPTS = 3  # tries of one transfer in all (urllib3 retries the request, we retry a body cut short)
BACKOFF_FACTOR = 0.5  # urllib3: no sleep before the first retry, then 1 s, 2 s, ...
MAX_BACKOFF = 10.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CHUNK = 8 * 1024 * 1024
GET_TIMEOUT = Timeout(connect=10.0, read=60.0)
PUT_TIMEOUT = Timeout(connect=10.0, read=300.0)
POLL_TIMEOUT = Timeout(connect=10.0, read=30.0)
HTTP = ("http://", "https://")


class _Retry(Retry):
    """urllib3's ``Retry`` with ``Retry-After`` capped: a server asking for an hour must not stall a GPU for one."""

    def get_retry_after(self, response: urllib3.BaseHTTPResponse) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, MAX_BACKOFF)


RETRY = _Retry(
    total=ATTEMPTS - 1,
    connect=ATTEMPTS - 1,
    read=ATTEMPTS - 1,
    status=ATTEMPTS - 1,
    other=0,
    backoff_factor=BACKOFF_FACTOR,
    backoff_max=MAX_BACKOFF,
    status_forcelist=RETRY_STATUSES,
    allowed_methods=frozenset({"GET", "PUT", "HEAD"}),
    raise_on_status=False,  # the last answer comes back and is reported with its status
    redirect=5,
)
POOL = urllib3.PoolManager(num_pools=32, maxsize=16, retries=RETRY, timeout=GET_TIMEOUT)


def check_url(url: str | None, what: str) -> str:
    """Only http(s): a job or training spec must never make the worker open local files or other schemes."""
    if not isinstance(url, str) or not url.startswith(HTTP):
        raise JobError(f"the URL of {what} must be http(s)")
    return url


def _reason(exc: BaseException) -> str:
    """The useful part of a urllib3 failure (``MaxRetryError`` wraps the last underlying error)."""
    if isinstance(exc, MaxRetryError) and exc.reason is not None:
        return str(exc.reason)
    return str(exc)


def _status_error(what: str, response: urllib3.BaseHTTPResponse) -> JobError:
    return JobError(f"{what} failed: HTTP {response.status} {response.reason or ''}".rstrip())


def get_bytes(url: str | None, what: str = "the parameters") -> bytes:
    """The body of a GET (``http(s)://``) or an S3 object (``s3://``, with the runtime's own credentials).

    This is how a job's parameters are read; any failure is a ``JobError`` naming ``what`` and the cause, so the
    job fails with a reason instead of the worker crashing. Connection errors, 5xx and 429 are retried first.
    """
    if not url:
        raise JobError(f"the job has no {what.removeprefix('the ')}")
    if url.startswith("s3://"):
        return _s3_get(url, what)
    if not url.startswith(HTTP):
        raise JobError(f"{what} location must be an http(s) or s3:// URL")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = POOL.request("GET", url, timeout=GET_TIMEOUT)
            break
        except urllib3.exceptions.ProtocolError as exc:  # the body was cut short after the headers: try again
            if attempt == ATTEMPTS:
                raise JobError(f"{what} could not be read: {_reason(exc)}") from exc
        except Urllib3Error as exc:  # urllib3 has retried connection errors, 5xx and 429 already
            raise JobError(f"{what} could not be read: {_reason(exc)}") from exc
        time.sleep(min(BACKOFF_FACTOR * 2**attempt, MAX_BACKOFF))
    if response.status != 200:
        raise JobError(f"{what} could not be read: HTTP {response.status} {response.reason or ''}".rstrip())
    return response.data


def _s3_get(uri: str, what: str) -> bytes:
    try:
        import boto3
    except ImportError:
        raise JobError(f"reading {what} from s3:// needs boto3 in the runtime") from None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:  # botocore's ClientError, NoCredentialsError, EndpointConnectionError, ...
        raise JobError(f"{what} could not be read: {exc}") from exc


def download(url: str, out: BinaryIO, what: str = "model download", *, allow_s3: bool = False) -> int:
    """Stream ``url`` into ``out`` (a seekable file, rewritten from the start on each try); returns the size.

    urllib3 retries failed connections and 5xx/429 answers; a body that ends before its Content-Length (a dropped
    connection mid-file) is retried here, because a model or dataset file is worth a second try while the job's
    GPU time is not yet spent. The error names ``what``: "model download failed: HTTP 404 Not Found".
    """
    if allow_s3 and url.startswith("s3://"):
        return _s3_download(url, out, what)
    if not url.startswith(HTTP):
        raise JobError(f"{what} failed: cannot download from {url[:40]}")
    for attempt in range(1, ATTEMPTS + 1):
        out.seek(0)
        out.truncate()
        try:
            return _stream(url, out, what)
        except _CutShort as exc:
            if attempt == ATTEMPTS:
                raise JobError(f"{what} failed: {exc}") from None
        except OSError as exc:  # the local side: a full disk is not worth a retry
            raise JobError(f"{what} failed: {exc}") from exc
        except Urllib3Error as exc:
            if attempt == ATTEMPTS or isinstance(exc, MaxRetryError):  # urllib3 has already retried those
                raise JobError(f"{what} failed: {_reason(exc)}") from exc
        log.warning("%s failed (try %d of %d), retrying", what, attempt, ATTEMPTS)
        time.sleep(min(BACKOFF_FACTOR * 2**attempt, MAX_BACKOFF))
    raise AssertionError("unreachable")


class _CutShort(Exception):
    """The body ended before its Content-Length (retried by :func:`download`)."""


def _stream(url: str, out: BinaryIO, what: str) -> int:
    response = POOL.request("GET", url, preload_content=False, decode_content=False, timeout=GET_TIMEOUT)
    try:
        if response.status != 200:
            raise _status_error(what, response)
        expected = response.headers.get("Content-Length")
        try:
            for chunk in response.stream(CHUNK, decode_content=False):
                out.write(chunk)
        except urllib3.exceptions.ProtocolError as exc:  # urllib3 enforces Content-Length: IncompleteRead
            raise _CutShort(f"cut short ({out.tell()} of {expected} bytes)") from exc
        written = out.tell()
        if expected is not None and written != int(expected):
            raise _CutShort(f"cut short ({written} of {expected} bytes)")
        return written
    finally:
        response.release_conn()


def _s3_download(uri: str, out: BinaryIO, what: str) -> int:
    try:
        import boto3
    except ImportError:
        raise JobError("s3:// model locations need boto3 in the runtime") from None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        boto3.client("s3").download_fileobj(bucket, key, out)
    except Exception as exc:
        raise JobError(f"{what} failed: {exc}") from exc
    return out.tell()


def download_file(url: str, target: Path, what: str) -> int:
    """Download an http(s) URL to ``target`` through a temporary sibling, so a failed transfer leaves no file.

    ``what`` names the file: "the URL of the training config must be http(s)", "downloading the training config
    failed: HTTP 403 Forbidden".
    """
    check_url(url, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with temp.open("w+b") as out:
            size = download(url, out, f"downloading {what}")
        os.replace(temp, target)
        return size
    finally:
        temp.unlink(missing_ok=True)


def put(url: str, body: bytes | Path, what: str, content_type: str = "application/octet-stream") -> None:
    """PUT bytes or a file (streamed, with Content-Length, as presigned S3 URLs require); retried like a GET.

    A file body is rewound by urllib3 before a retry. Any answer but 2xx is a ``JobError`` naming ``what``:
    "uploading the output failed: HTTP 403 Forbidden".
    """
    check_url(url, what)
    headers = {"Content-Type": content_type}
    try:
        if isinstance(body, Path):
            headers["Content-Length"] = str(body.stat().st_size)
            with body.open("rb") as stream:
                response = POOL.request("PUT", url, body=stream, headers=headers, timeout=PUT_TIMEOUT)
        else:
            headers["Content-Length"] = str(len(body))
            response = POOL.request("PUT", url, body=body, headers=headers, timeout=PUT_TIMEOUT)
    except Urllib3Error as exc:
        raise JobError(f"uploading {what} failed: {_reason(exc)}") from exc
    if not 200 <= response.status < 300:
        raise _status_error(f"uploading {what}", response)


def status_of(url: str, timeout: Timeout = POLL_TIMEOUT) -> int | None:
    """The status of one GET without retries (a poll: the next one comes soon), or None on a network error.

    The body is not read: a cancel URL answers 200 when the job was deleted, and only the status matters.
    """
    if not url.startswith(HTTP):
        return None
    try:
        response = POOL.request("GET", url, preload_content=False, retries=False, timeout=timeout)
    except Urllib3Error:
        return None
    try:
        return response.status
    finally:
        response.drain_conn()
        response.release_conn()
