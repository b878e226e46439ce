"""The local store's presigned URLs: S3's PUT, part PUT and GET semantics on our own disk (contract §1).

Authenticated by the signature in the URL only (bound to method, key, upload, part and expiry), exactly like an S3
presigned URL; no session, key or CSRF token. Bodies stream to disk in 1 MiB chunks whatever their size.
"""

from __future__ import annotations

import errno
import mimetypes
import re

from django.http import FileResponse, HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from esd.storage import LocalBlobStore, StorageError, blob_store

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, PUT, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Expose-Headers": "ETag, Content-Length, Content-Range",
    "Access-Control-Max-Age": "3600",
}
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def s3_error(status: int, code: str, message: str) -> HttpResponse:
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return HttpResponse(body, status=status, content_type="application/xml", headers=CORS)


@csrf_exempt
def blob(request: HttpRequest, key: str) -> HttpResponse:
    store = blob_store()
    if not isinstance(store, LocalBlobStore):
        return s3_error(404, "NoSuchKey", "Objects are served by S3 in this deployment.")
    if request.method == "OPTIONS":
        return HttpResponse(status=200, headers=CORS)
    method = "GET" if request.method == "HEAD" else request.method
    if method not in ("GET", "PUT"):
        return s3_error(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
    if not store.verify(method, key, request.GET.dict()):
        return s3_error(403, "AccessDenied", "Request has expired or the signature does not match.")
    try:
        if method == "PUT":
            return _put(request, store, key)
        return _get(request, store, key)
    except FileNotFoundError:
        return s3_error(404, "NoSuchKey", "The specified key does not exist.")
    except StorageError as exc:
        return s3_error(400, "InvalidRequest", str(exc))
    except OSError as exc:  # a key segment longer than the file system allows, ...
        if exc.errno == errno.ENAMETOOLONG:
            return s3_error(400, "KeyTooLongError", "Your key is too long.")
        raise


def _put(request: HttpRequest, store: LocalBlobStore, key: str) -> HttpResponse:
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    upload_id = request.GET.get("uploadId", "")
    if upload_id:
        part = int(request.GET.get("partNumber", "0") or 0)
        if not 1 <= part <= 10_000 or store.upload_key(upload_id) != key:
            return s3_error(404, "NoSuchUpload", "The specified upload does not exist.")
        etag = store.receive_part(upload_id, part, request, length)
    else:
        etag = store.receive_object(key, request, length)
    return HttpResponse(status=200, headers={**CORS, "ETag": etag})


def _get(request: HttpRequest, store: LocalBlobStore, key: str) -> HttpResponse:
    path = store.path(key)
    if not path.is_file():
        raise FileNotFoundError(key)
    size = path.stat().st_size
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    # Stored files come from clients: opened in a browser they must not run as our origin (no console access).
    headers = {**CORS, "Accept-Ranges": "bytes", "Content-Security-Policy": "sandbox"}
    match = RANGE.match(request.headers.get("Range", ""))
    status, start, end = 200, 0, size - 1
    if match and (match.group(1) or match.group(2)):
        start_text, end_text = match.groups()
        if start_text:
            start, end = int(start_text), min(int(end_text) if end_text else size - 1, size - 1)
        else:  # a suffix: the last N bytes
            start = max(size - int(end_text), 0)
        if start > end or start >= size:
            return HttpResponse(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    if request.method == "HEAD":
        return HttpResponse(status=status, content_type=content_type, headers=headers)
    handle = path.open("rb")
    if status == 200:
        response = FileResponse(handle, content_type=content_type)
    else:
        handle.seek(start)
        response = StreamingHttpResponse(_limited(handle, end - start + 1), status=206, content_type=content_type)
    for name, value in headers.items():
        response[name] = value
    return response


def _limited(handle, remaining: int):
    with handle:
        while remaining > 0:
            chunk = handle.read(min(1024 * 1024, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
