"""The worker's disk cache of model files, keyed by checkpoint id and file name.

A GPU host has no storage credentials: it downloads each file once from the presigned URL in the job message
(streamed to a temporary file by :mod:`gpu_runtime.transfer` - retried, size checked - then renamed into place)
and evicts the least recently used files when the cache grows past its budget. SageMaker containers read
``s3://`` URIs with their own IAM role instead.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from gpu_runtime import transfer
from gpu_runtime.errors import JobError

log = logging.getLogger(__name__)


class ModelFiles:
    """``root/<checkpoint id>/<file name>``, at most ``max_bytes`` in total (files in use are never evicted)."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pinned: set[Path] = set()

    def path(self, checkpoint_id: str, filename: str) -> Path:
        for part in (checkpoint_id, filename):
            if not part or "/" in part or "\\" in part or part in (".", ".."):
                raise JobError(f"model file name {checkpoint_id}/{filename} is not allowed")
        return self.root / checkpoint_id / filename

    def fetch(self, checkpoint_id: str, filename: str, source: str) -> Path:
        """The local copy of a model file, downloading it from ``source`` (https URL or s3:// URI) if needed."""
        target = self.path(checkpoint_id, filename)
        with self._lock:
            self._pinned.add(target)
        if target.exists():
            os.utime(target)  # least recently used = oldest mtime
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".download-")
        started = time.monotonic()
        try:
            with os.fdopen(handle, "wb") as out:
                size = transfer.download(source, out, "model download", allow_s3=True)
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        log.info(
            "downloaded %s/%s (%.1f MB) in %.1f s", checkpoint_id, filename, size / 1e6, time.monotonic() - started
        )
        self.evict()
        return target

    def pin(self, path: Path) -> None:
        """Keep a file the runtime derived from a download (a converted ``.ckpt``) while a job uses it."""
        with self._lock:
            self._pinned.add(path)

    def release(self, paths: list[Path]) -> None:
        """Files a job no longer needs may be evicted again."""
        with self._lock:
            self._pinned.difference_update(paths)

    def evict(self) -> None:
        with self._lock:
            files = sorted(
                (p for p in self.root.glob("*/*") if p.is_file() and not p.name.startswith(".")),
                key=lambda p: p.stat().st_mtime,
            )
            total = sum(p.stat().st_size for p in files)
            for path in files:
                if total <= self.max_bytes:
                    break
                if path in self._pinned:
                    continue
                total -= path.stat().st_size
                path.unlink(missing_ok=True)
                log.info("evicted %s from the model cache", path)
