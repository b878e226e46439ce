"""Multipart upload throughput of the blob store, the way ESD clients upload checkpoints, against a plain file copy.

Writes a --size-mib test file (a 64 MiB random block repeated) to a fresh temporary folder in the system temp dir,
then times, on that same filesystem with the page cache warm (nothing dropped):

* plain copy: ``shutil.copyfile`` of the test file to another file beside it, then ``fsync`` (the baseline, median
  of 3). The local store flushes every completed object to disk before it acknowledges it, as an object store must,
  so the fair comparison is a durable copy; a copy left in the page cache is printed for reference;
* local: ``manage.py migrate`` then ``manage.py runesd --no-worker`` (waitress) on a free port with
  ``ESD_STORAGE=local`` and a fresh ``ESD_VAR_DIR`` in the temporary folder. This process sets the same environment
  and calls ``django.setup()``, so ``blob_store()`` signs URLs the server accepts: ``start_multipart``, one
  ``presign_part`` URL per --part-mib part, --parallel concurrent PUTs streamed from the file, then
  ``complete_multipart`` here (the API does it server-side on the same disk);
* s3: the same upload through presigned ``upload_part`` URLs of a moto ``ThreadedMotoServer`` running in this
  process, with a plain boto3 client (SigV4, path-style). moto measures moto (a Python dev server), not a disk.

Timed from the first PUT to the completed object; size and SHA-256 of the stored object are checked afterwards.
Prints MB/s (MB = 10^6 bytes), seconds and the ratio to the plain copy.

    .venv/bin/python bench/upload_bench.py [--size-mib 1024] [--part-mib 64] [--parallel 4] [--skip-s3]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
RANDOM_BLOCK = 64 * MIB
SEND_BLOCK = MIB  # bytes per read of a part while sending it (http.client's default is 8 KiB)
DJANGO_KEY = "esd-upload-bench-fixed-key-0123456789abcdefghijklmnopqrstuvwxyz"  # same in server and bench
KEY = "bench/upload-bench.bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def filesystem_of(path: Path) -> str:
    """``ext4 on /dev/vda (mounted at /)`` for the mount holding ``path`` (Linux); ``unknown`` elsewhere."""
    real = os.path.realpath(path)
    best = ("", "unknown", "unknown")
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "unknown filesystem"
    for line in lines:
        left, _, right = line.partition(" - ")
        mount_point = left.split()[4].replace("\\040", " ")
        fstype, source = [*right.split(), "?", "?"][:2]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, fstype, source)
    return f"{best[1]} on {best[2]} (mounted at {best[0]})"


def write_test_file(path: Path, size: int) -> None:
    block = os.urandom(min(RANDOM_BLOCK, size))
    with path.open("wb") as out:
        remaining = size
        while remaining > 0:
            remaining -= out.write(block[: min(len(block), remaining)])


def sha256_of(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(8 * MIB):
        digest.update(chunk)
    return digest.hexdigest()


class PartReader:
    """``length`` bytes of a file from ``offset``, read on demand: a PUT body that never holds more than a block."""

    def __init__(self, path: Path, offset: int, length: int):
        self.file = path.open("rb")
        self.file.seek(offset)
        self.remaining = length

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        data = self.file.read(self.remaining if size < 0 else min(size, self.remaining))
        self.remaining -= len(data)
        return data

    def __enter__(self) -> PartReader:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def put_part(url: str, source: Path, offset: int, length: int) -> str:
    """PUT one part to its presigned URL, streamed from the file; returns the ETag the store answered."""
    parsed = urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600, blocksize=SEND_BLOCK)
    try:
        with PartReader(source, offset, length) as body:
            conn.request("PUT", f"{parsed.path}?{parsed.query}", body=body, headers={"Content-Length": str(length)})
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise SystemExit(f"PUT part at {offset}: {response.status} {answer[:300]!r}")
        etag = response.getheader("ETag")
        if not etag:
            raise SystemExit(f"PUT part at {offset}: no ETag in the answer")
        return etag
    finally:
        conn.close()


def split(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """``(part number, offset, length)`` for every part, numbered from 1 as S3 does."""
    return [(n + 1, offset, min(part_size, size - offset)) for n, offset in enumerate(range(0, size, part_size))]


def put_parts(urls: dict[int, str], source: Path, parts: list[tuple[int, int, int]], parallel: int) -> list[dict]:
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = {n: pool.submit(put_part, urls[n], source, offset, length) for n, offset, length in parts}
        return [{"ETag": futures[n].result(), "PartNumber": n} for n, _, _ in parts]


def wait_until_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"runesd exited: {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"runesd did not start\n{log.read_text()[-3000:]}")


def bench_copy(source: Path, work: Path, size: int, *, durable: bool) -> dict:
    """Median of three ``shutil.copyfile`` runs, each flushed to disk with ``fsync`` when ``durable``."""
    target = work / "copy.bin"
    runs = []
    for _ in range(3):
        began = time.perf_counter()
        shutil.copyfile(source, target)
        if durable:
            with target.open("rb+") as copied:
                os.fsync(copied.fileno())
        runs.append(time.perf_counter() - began)
        if target.stat().st_size != size:
            raise SystemExit("plain copy: wrong size")
        target.unlink()
    what = "shutil.copyfile + fsync" if durable else "shutil.copyfile, left in the page cache"
    return {
        "seconds": statistics.median(runs),
        "note": f"{what}, median of 3: " + ", ".join(f"{r:.2f}" for r in runs) + " s",
    }


def bench_local(args: argparse.Namespace, source: Path, work: Path, size: int, digest: str) -> dict:
    port = free_port()
    var_dir = work / "esd-var"
    var_dir.mkdir()
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "esd.settings",
            "ESD_VAR_DIR": str(var_dir),
            "ESD_STORAGE": "local",
            "ESD_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "SECRET_KEY": DJANGO_KEY,
            "LOG_LEVEL": "WARNING",
        }
    )
    for name in ("DATABASE_URL", "DRAMATIQ_BROKER_URL"):
        os.environ.pop(name, None)
    env = dict(os.environ)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    log = work / "runesd.log"
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "manage.py", "runesd", "--port", str(port), "--no-worker"],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_listening(port, server, log)
        import django

        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        django.setup()
        from esd.storage import LocalBlobStore, blob_store

        store = blob_store()
        if not isinstance(store, LocalBlobStore):
            raise SystemExit(f"expected the local store, got {type(store).__name__}")
        parts = split(size, args.part_mib * MIB)
        upload_id = store.start_multipart(KEY)
        urls = {n: store.presign_part(KEY, upload_id, n, 3600) for n, _, _ in parts}
        began = time.perf_counter()
        etags = put_parts(urls, source, parts, args.parallel)
        uploaded = time.perf_counter()
        store.complete_multipart(KEY, upload_id, etags)
        done = time.perf_counter()
        info = store.head(KEY)
        if info is None or info.size != size:
            raise SystemExit(f"local: stored size {info and info.size} != {size}")
        with store.open(KEY) as stored:
            if sha256_of(stored) != digest:
                raise SystemExit("local: SHA-256 of the stored object differs from the source")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "seconds": done - began,
        "note": f"PUTs {uploaded - began:.2f} s + complete {done - uploaded:.2f} s",
    }


def bench_s3(args: argparse.Namespace, source: Path, size: int, digest: str) -> dict:
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    os.environ.pop("AWS_SESSION_TOKEN", None)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )
        bucket = "esd-upload-bench"
        s3.create_bucket(Bucket=bucket)
        parts = split(size, args.part_mib * MIB)
        upload_id = s3.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]
        urls = {
            n: s3.generate_presigned_url(
                "upload_part",
                Params={"Bucket": bucket, "Key": KEY, "UploadId": upload_id, "PartNumber": n},
                ExpiresIn=3600,
            )
            for n, _, _ in parts
        }
        began = time.perf_counter()
        etags = put_parts(urls, source, parts, args.parallel)
        uploaded = time.perf_counter()
        s3.complete_multipart_upload(Bucket=bucket, Key=KEY, UploadId=upload_id, MultipartUpload={"Parts": etags})
        done = time.perf_counter()
        stored_size = s3.head_object(Bucket=bucket, Key=KEY)["ContentLength"]
        if stored_size != size:
            raise SystemExit(f"s3: stored size {stored_size} != {size}")
        if sha256_of(s3.get_object(Bucket=bucket, Key=KEY)["Body"]) != digest:
            raise SystemExit("s3: SHA-256 of the stored object differs from the source")
        s3.delete_object(Bucket=bucket, Key=KEY)
    finally:
        moto.stop()
    return {
        "seconds": done - began,
        "note": f"PUTs {uploaded - began:.2f} s + complete {done - uploaded:.2f} s",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the uploaded file")
    parser.add_argument("--part-mib", type=int, default=64, help="multipart part size")
    parser.add_argument("--parallel", type=int, default=4, help="concurrent part PUTs")
    parser.add_argument("--skip-s3", action="store_true", help="skip the moto (S3) mode")
    args = parser.parse_args()
    if args.size_mib < 1 or args.part_mib < 5 or args.parallel < 1:
        parser.error("--size-mib >= 1, --part-mib >= 5 (S3's minimum part) and --parallel >= 1")

    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="esd-upload-bench-"))
    results: dict[str, dict] = {}
    try:
        source = work / "source.bin"
        write_test_file(source, size)
        with source.open("rb") as stream:
            digest = sha256_of(stream)
        results["plain copy"] = bench_copy(source, work, size, durable=True)
        results["cached copy"] = bench_copy(source, work, size, durable=False)
        results["local"] = bench_local(args, source, work, size, digest)
        if not args.skip_s3:
            results["s3 (moto)"] = bench_s3(args, source, size, digest)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    parts = len(split(size, args.part_mib * MIB))
    print(
        f"{args.size_mib} MiB file ({size / 1e6:.0f} MB; a 64 MiB random block repeated) in {parts} parts of "
        f"{args.part_mib} MiB, {args.parallel} concurrent PUTs; MB = 10^6 bytes"
    )
    print(f"disk: {work} (system temp dir) on {filesystem_of(work.parent)}; all runs read and write this filesystem")
    print(
        "page cache warm for all runs (source written just before, nothing dropped); the baseline and the local "
        "store flush the result to disk, the cached copy does not"
    )
    print(
        "local: runesd (waitress, 8 threads, 1 MiB socket reads) on ESD_VAR_DIR in that folder; waitress spools "
        f"request bodies to {tempfile.gettempdir()}; completion (part assembly) runs in this process"
    )
    if not args.skip_s3:
        print(
            "s3: moto ThreadedMotoServer in this process (werkzeug dev server sharing this GIL; each part body is "
            "read into memory, completion joins all parts in memory; moto keeps parts and objects in "
            "SpooledTemporaryFiles that spill to the system temp dir above ~5 MiB): the number measures moto, "
            "not a disk"
        )
    base = size / 1e6 / results["plain copy"]["seconds"]
    print(f"{'mode':<12}{'MB/s':>9}{'seconds':>10}{'ratio':>8}  note")
    for name, r in results.items():
        rate = size / 1e6 / r["seconds"]
        print(f"{name:<12}{rate:>9.0f}{r['seconds']:>10.2f}{rate / base:>8.2f}  {r['note']}")
    local = results["plain copy"]["seconds"] / results["local"]["seconds"]
    cached = results["cached copy"]["seconds"] / results["local"]["seconds"]
    print(f"local/plain copy: {local:.2f} (target >= 0.5); local/cached copy: {cached:.2f}")


if __name__ == "__main__":
    main()
