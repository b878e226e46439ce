"""The training worker: runs ``run_training(job_id, spec)`` jobs from the training queue (contract §12.2).

Why it is built this way: a GPU host gets no storage credentials, so a training spec carries a presigned URL for
everything - the merged kohya config, the base checkpoint, every dataset file, an upload URL per file the run may
produce, and a cancel URL that answers 200 once the job was deleted. :func:`run_spec` turns one spec into
downloads, a :func:`gpu_runtime.trainer.train` run and uploads, and reports each stage as a ``training`` event
(``Downloading`` -> ``Training`` with progress -> ``Uploading`` -> ``Completed``, or ``Failed``/``Stopped``); it never
raises, so a bad job can never take the worker down. :class:`TrainingWorker` feeds it from the queue one job at a
time (trainings fill a GPU), and :func:`main_train` runs one job by hand. ``trainer --once`` takes a single
training and exits, which is how Kubernetes runs trainings (a KEDA ``ScaledJob``, one Job per queued training,
``apps.endpoints.k8s``): a Job is never scaled in, so an hours-long run is never killed half-way by an autoscaler
that sees an empty queue while it trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dramatiq

from gpu_runtime import protocol, transfer
from gpu_runtime.errors import JobError
from gpu_runtime.service import HEARTBEAT_SECONDS, CancelWatch, QueueService

log = logging.getLogger(__name__)

__all__ = ["TrainingWorker", "main_train", "main_trainer", "run_spec"]

CANCEL_POLL_SECONDS = 2.0
PROGRESS_EVERY_SECONDS = 5.0
DEFAULT_CACHE_BYTES = 100 * 1024**3
DOWNLOAD_THREADS = 8
Send = Callable[[dict], None]


# --- HTTP --------------------------------------------------------------------------------------------------------


def _download(url: str, target: Path, what: str) -> int:
    """Stream ``url`` into ``target`` (retried, size-checked, via a temporary sibling: see :mod:`transfer`)."""
    return transfer.download_file(url, target, what)


def _upload(url: str, path: Path, what: str) -> None:
    """PUT a file (streamed, with Content-Length, as presigned S3 URLs require; retried on 5xx/429)."""
    transfer.put(url, path, what)


class _Uploads:
    """Uploads a running training's files as the trainer writes them (``train(on_output=...)``), one at a time on a
    background thread; :meth:`flush` hands what was saved (or removed) since the last call to the training thread,
    which reports it as ``saved`` entries. Events are sent from one thread only, so they leave in order, and the
    upload thread never opens a broker connection of its own (RabbitMQ's are per thread).

    Why during the run and not at the end: a state or epoch file saved before a failure or a stop is what a resume
    continues from, and sample images are worth seeing while the run goes on. Model files and states go to their
    presigned ``outputs`` URL by name; sample images take the spec's ``samples`` slots in the order they are made.
    ``entries`` (everything saved, removals applied) also travels with the final event, so the server has the whole
    list whatever order it handles events in.
    """

    def __init__(self, outputs: dict[str, str], slots: list[str], output_dir: Path):
        self.outputs, self.slots, self.output_dir = outputs, slots, output_dir
        self.ready: list[dict] = []  # saved or removed since the last flush
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training-upload")
        self.pending: list[Any] = []
        self.saved: dict[tuple[str, str], dict] = {}
        self.removed: set[str] = set()
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.next_slot = 0
        self.lock = threading.Lock()

    def __call__(self, info: dict) -> None:
        """The trainer's ``on_output`` (on the training thread): queue the upload, or the removal report."""
        path: Path = info["path"]
        name = path.relative_to(self.output_dir).as_posix()
        entry = {"name": name, "kind": info["kind"], "epoch": info["epoch"], "step": info["step"]}
        if info.get("removed"):
            with self.lock:
                self.removed.add(name)
            self.pending.append(self.pool.submit(self._report_removed, {**entry, "removed": True}))
            return
        if info["kind"] == "sample":
            if self.next_slot >= len(self.slots):
                if self.next_slot == len(self.slots):
                    self.warnings.append(
                        f"sample image {name} and later ones were not uploaded: the job has {len(self.slots)} "
                        "sample upload slots"
                    )
                self.next_slot += 1
                return
            entry["slot"], url = self.next_slot, self.slots[self.next_slot]
            self.next_slot += 1
        else:
            url = self.outputs.get(name)
            if url is None:
                self.warnings.append(f"{name} was produced but the job has no upload URL for it: not uploaded")
                return
        with self.lock:
            self.removed.discard(name)  # a later run's file of the same name
        self.pending.append(self.pool.submit(self._upload, entry, path, url))

    def _upload(self, entry: dict, path: Path, url: str) -> None:
        with self.lock:
            if entry["name"] in self.removed:  # deleted again before its turn came: nothing to keep
                return
        try:
            _upload(url, path, entry["name"])
        except Exception as exc:
            log.warning("upload of %s failed", entry["name"], exc_info=True)
            if entry["kind"] == "sample":  # a missing sample image costs a picture, not the training
                self.warnings.append(f"sample image {entry['name']} could not be uploaded: {exc}")
            else:
                self.errors.append(f"{entry['name']}: {exc}")
            return
        with self.lock:
            self.saved[(entry["kind"], entry["name"])] = entry
            self.ready.append(entry)

    def _report_removed(self, entry: dict) -> None:
        """Reported whether or not this run uploaded it: a resumed run removes files of the run before, which the
        server knows and deletes."""
        with self.lock:
            self.saved.pop((entry["kind"], entry["name"]), None)
            self.ready.append(entry)

    def flush(self) -> list[dict]:
        """What was saved or removed since the last flush (for the training thread to report)."""
        with self.lock:
            ready, self.ready = self.ready, []
        return ready

    def wait(self) -> None:
        """Every queued upload done (their failures are in ``errors``)."""
        for future in self.pending:
            future.result()
        self.pending = []

    def close(self) -> None:
        self.wait()
        self.pool.shutdown(wait=True)

    def entries(self) -> list[dict]:
        with self.lock:
            return list(self.saved.values())

    def uploaded(self, name: str) -> bool:
        with self.lock:
            return any(saved == name for _, saved in self.saved)


# --- one job -----------------------------------------------------------------------------------------------------


def _safe_name(job_id: str) -> str:
    """A folder name for a job id; ids that needed cleaning get a hash suffix so two ids never share a folder."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:100].strip(".") or "job"
    return cleaned if cleaned == job_id else f"{cleaned}-{uuid.uuid5(uuid.NAMESPACE_OID, job_id).hex[:8]}"


def _spec_family_warning(fm_type: str, family: str) -> str | None:
    """ESD's ``fm_type`` picks kohya's SD or SDXL script; here the checkpoint decides, so a mismatch is a warning."""
    from gpu_runtime.families import FAMILIES

    known = FAMILIES.get(family)
    xl = known is not None and "XL" in known.pipeline_class
    if fm_type == "sd_xl" and not xl:
        return f"fm_type is sd_xl but the base model is a {family} checkpoint: trained as {family}"
    if fm_type == "sd_1_5" and xl:
        return "fm_type is sd_1_5 but the base model is an SDXL checkpoint: trained as SDXL"
    return None


def run_spec(
    job_id: str,
    spec: dict,
    work_root: Path,
    *,
    device: str = "auto",
    send: Send,
    is_cancelled: Callable[[], bool],
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    cancel_poll_seconds: float = CANCEL_POLL_SECONDS,
    progress_seconds: float = PROGRESS_EVERY_SECONDS,
) -> None:
    """Run one training spec end to end and report every stage through ``send`` as a ``training`` event.

    Downloads go to ``work_root/jobs/<job id>/`` (removed afterwards); the base checkpoint is cached by key under
    ``work_root/models/`` (shared with the inference engine's cache layout) and config dirs under
    ``work_root/configs/``. Never raises: a failure is a ``Failed`` event with a reason, a cancellation (the
    cancel URL answering 200, or ``is_cancelled()``) a ``Stopped`` event.
    """

    attempt = spec.get("attempt", 1) if isinstance(spec, dict) and isinstance(spec.get("attempt"), int) else 1

    def report(status: str, reason: str = "", **extra: Any) -> None:
        try:
            send(protocol.training_status(job_id, status, reason, attempt=attempt, **extra))
        except Exception:
            log.exception("could not report %s for training %s", status, job_id)

    def end(status: str, reason: str = "", **extra: Any) -> None:
        """The final event, after the uploads in flight: it carries everything saved (a resume needs the states)
        and ``seconds``, how long this run trained (0 when it never got to training), which the server adds up
        over a resumed job's runs for its GPU-seconds accounting."""
        if uploads is not None:  # with the removals not reported yet
            uploads.close()
            removals = [entry for entry in uploads.flush() if entry.get("removed")]
            extra.setdefault("saved", uploads.entries() + removals)
        since = trained["since"]
        extra.setdefault("seconds", round(time.monotonic() - since, 1) if since is not None else 0.0)
        report(status, reason, **extra)

    work_root = Path(work_root)
    job_dir: Path | None = None
    watch = CancelWatch(None, is_cancelled, cancel_poll_seconds, name="training-cancel-watch")
    files = None
    model_path: Path | None = None
    uploads: _Uploads | None = None
    trained: dict[str, float | None] = {"since": None}  # when train() was called: the end events' ``seconds``
    try:
        from gpu_runtime.files import ModelFiles
        from gpu_runtime.trainer import TrainingCancelled, TrainingError, train

        try:
            protocol.validate_training_spec(spec)
        except protocol.ProtocolError as exc:
            end("Failed", f"invalid training spec: {exc}")
            return
        urls = spec["urls"]
        watch = CancelWatch(urls.get("cancel"), is_cancelled, cancel_poll_seconds, name="training-cancel-watch")
        if watch.poll() or watch():
            end("Stopped", "the training was cancelled before it started")
            return
        watch.start()
        report("Downloading")
        job_dir = work_root / "jobs" / _safe_name(job_id)
        shutil.rmtree(job_dir, ignore_errors=True)
        dataset_dir, output_dir = job_dir / "dataset", job_dir / "output"
        dataset_dir.mkdir(parents=True)
        output_dir.mkdir(parents=True)
        config_path = job_dir / "config.toml"
        _download(urls["config"], config_path, "the training config")

        parts = spec["model_key"].strip("/").split("/")
        files = ModelFiles(work_root / "models", cache_bytes)
        model_path = files.fetch(parts[-2] if len(parts) > 1 else "training", parts[-1], urls["model"])
        if watch():
            raise TrainingCancelled("cancelled while downloading")

        def fetch(item: tuple[str, str]) -> None:
            if watch():
                return
            relative, url = item
            _download(url, dataset_dir.joinpath(*relative.split("/")), f"dataset file {relative}")

        def fetch_input(item: tuple[str, str]) -> None:
            if watch():
                return
            relative, url = item
            _download(url, job_dir.joinpath(*relative.split("/")), relative)

        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="training-download") as pool:
            for _ in pool.map(fetch, sorted(urls["dataset"].items())):
                pass
            for _ in pool.map(fetch_input, sorted((urls.get("inputs") or {}).items())):
                pass
        if watch():
            raise TrainingCancelled("cancelled while downloading")

        extra_warnings = []
        try:
            from gpu_runtime.families import family_of_file

            mismatch = _spec_family_warning(spec["fm_type"], family_of_file(model_path))
            if mismatch:
                extra_warnings.append(mismatch)
        except Exception:  # an unreadable model fails with a clear reason inside train()
            log.debug("family check skipped", exc_info=True)

        report("Training")
        uploads = _Uploads(urls["outputs"], list(urls.get("samples") or []), output_dir)
        last = {"at": 0.0, "epoch": 0}

        def progress(info: dict) -> None:
            now = time.monotonic()
            if now - last["at"] >= progress_seconds or info["step"] == info["steps"] or info["epoch"] != last["epoch"]:
                last.update(at=now, epoch=info["epoch"])
                report("Training", **{k: info[k] for k in ("epoch", "epochs", "step", "steps")}, loss=info["loss"])
            saved = uploads.flush()
            if saved:
                report("Training", saved=saved)

        trained["since"] = time.monotonic()
        result = train(
            config_path,
            model_path,
            dataset_dir,
            output_dir,
            device=device,
            on_progress=progress,
            should_stop=watch,
            work_dir=work_root,
            on_output=uploads,
            uploadable=frozenset(urls["outputs"]),  # a run that would write a file with no URL fails first
        )
        report("Uploading")
        uploads.wait()
        warnings = extra_warnings + result.warnings + uploads.warnings
        if uploads.errors:
            raise JobError("could not upload " + "; ".join(uploads.errors))
        uploaded = [path.name for path in result.files if uploads.uploaded(path.name)]
        if not uploaded:
            names = ", ".join(p.name for p in result.files)
            end("Failed", f"none of the produced files ({names}) has an upload URL in the spec", warnings=warnings)
            return
        end(
            "Completed",
            files=uploaded,
            warnings=warnings,
            loss=result.loss,
            steps=result.steps,
            epochs=result.epochs,
            seconds=round(result.seconds, 1),
        )
    except TrainingCancelled as exc:
        end("Stopped", f"the training was cancelled ({exc})")
    except (TrainingError, JobError) as exc:
        end("Failed", str(exc))
    except Exception as exc:
        log.exception("training %s failed", job_id)
        end("Failed", f"internal error: {type(exc).__name__}: {exc}")
    finally:
        watch.stop()
        if uploads is not None:
            uploads.close()
        if files is not None and model_path is not None:
            files.release([model_path])
        if job_dir is not None:
            shutil.rmtree(job_dir, ignore_errors=True)
        _free_memory()


def _free_memory() -> None:
    """Trainings load a whole checkpoint; give its memory back before the next job."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        log.debug("could not empty the CUDA cache", exc_info=True)


# --- the queue worker --------------------------------------------------------------------------------------------


class TrainingWorker(QueueService):
    """Consumes the training queue one job at a time and reports on the events queue (like ``GpuWorker``).

    Messages: ``run_training(job_id, spec)`` runs :func:`run_spec`; ``cancel_training(job_id)`` marks the id as
    cancelled - a job that is taken from the queue later is answered ``Stopped`` without running, the running one
    is stopped at its next step. The queue is read with prefetch 1 (a training fills the GPU, and queued jobs stay
    available to other workers), so a cancel *message* queued behind the running job is read only after it; the
    running job also polls its spec's cancel URL every 2 s, which is what stops it promptly. A message is acked
    only after its job has finished; on stop the job in hand is finished first. The training runs on the work
    thread while the consumer thread keeps the broker connection serviced (a training can run for hours), and the
    worker heartbeats every 15 s with its queue name as the endpoint while its consumer is healthy.

    ``once``: handle one ``run_training`` message (run it, or answer it ``Stopped`` when it was cancelled), ack it,
    then stop; messages received meanwhile and not started go back to the queue, cancels are handled as always.
    ``idle_exit_seconds`` (with ``once``): stop when no training arrived in that time after the start, so a Job
    started for a message another Job took (or for a cancel message) gives its GPU back.
    """

    thread_prefix = "training-worker"

    def __init__(
        self,
        broker: dramatiq.Broker,
        work_root: Path,
        *,
        queue: str = "esd-training",
        events_queue: str = "esd-events",
        device: str = "auto",
        poll_ms: int = 200,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cancel_poll_seconds: float = CANCEL_POLL_SECONDS,
        progress_seconds: float = PROGRESS_EVERY_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        worker_id: str | None = None,
        instance_type: str = "",
        once: bool = False,
        idle_exit_seconds: float = 0.0,
    ) -> None:
        super().__init__(
            broker,
            events_queue,
            queue_name=queue,
            prefetch=1,
            max_batch=1,
            poll_ms=poll_ms,
            heartbeat_seconds=heartbeat_seconds,
            worker_id=worker_id,
            instance_type=instance_type,
        )
        self.work_root = Path(work_root)
        self.device = device
        self.cache_bytes = cache_bytes
        self.cancel_poll_seconds = cancel_poll_seconds
        self.progress_seconds = progress_seconds
        self.lock = threading.Lock()
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.current: str | None = None
        self.once = once
        self.idle_exit_seconds = idle_exit_seconds
        self.took_one = threading.Event()  # a run_training message was received (``once``: the only one)
        self.trainings_handled = 0

    # --- once ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """The worker's threads, and with ``once`` and ``idle_exit_seconds`` the idle watch."""
        super().start()
        if self.once and self.idle_exit_seconds > 0:
            thread = threading.Thread(target=self._idle_watch, name=f"{self.thread_prefix}-idle", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _idle_watch(self) -> None:
        """``once``: stop when no training has arrived in ``idle_exit_seconds``. A message accepted at the same
        moment is safe: a started one is finished first, one not started is given back to the queue."""
        if self.took_one.wait(self.idle_exit_seconds) or self.stopping.is_set():
            return
        log.info("no training within %g s: stopping (--once)", self.idle_exit_seconds)
        self.stopping.set()
        self._wake.set()

    def _accept(self, consumer: Any, message: Any) -> None:
        """Note the arrival of a training (the idle watch), then accept it as usual."""
        if message.actor_name == protocol.RUN_TRAINING:
            self.took_one.set()
        super()._accept(consumer, message)

    # --- jobs ------------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """Mark a job as cancelled: stops it if it is running, skips it if it arrives later."""
        with self.lock:
            self.cancelled[job_id] = None
            while len(self.cancelled) > 10000:
                self.cancelled.popitem(last=False)
        if job_id == self.current:
            log.info("training %s: cancel requested, stopping at the next step", job_id)

    def send_as_worker(self, event: dict) -> None:
        """A training event naming this worker: the server fails a running training whose worker stops
        heartbeating (a killed pod or host), instead of showing it as training for ever."""
        self.send_quietly({**event, "worker": self.worker_id})

    def is_cancelled(self, job_id: str) -> bool:
        """Whether a cancel for this job has been seen (thread-safe: the running job asks from its own thread)."""
        with self.lock:
            return job_id in self.cancelled

    def inline(self, message: Any) -> bool:
        """A cancel is handled on the consumer thread at once: it must reach a running training, not queue behind."""
        if message.actor_name != protocol.CANCEL_TRAINING:
            return False
        self.handle(message)
        return True

    def job_id(self, message: Any) -> str | None:
        """The run id (:func:`protocol.training_run`) of a ``run_training`` message (None for anything else)."""
        args = tuple(message.args or ())
        if message.actor_name != protocol.RUN_TRAINING or len(args) != 2:
            return None
        return _run_id(args[0], args[1])

    def run_batch(self, messages: list[Any]) -> None:
        """The work thread's entry point (batches are of one: prefetch 1)."""
        for message in messages:
            self.handle(message)

    def handle(self, message: Any) -> None:
        """One queue message: a cancel, or a training to run (skipped when cancelled or already done)."""
        args, kwargs = tuple(message.args or ()), dict(message.kwargs or {})
        if message.actor_name == protocol.CANCEL_TRAINING:
            job_id = args[0] if args else kwargs.get("job_id")
            attempt = args[1] if len(args) > 1 else kwargs.get("attempt", 1)
            if isinstance(job_id, str) and job_id:
                self.cancel(protocol.training_run(job_id, attempt if isinstance(attempt, int) else 1))
            else:
                log.warning("ignoring cancel_training message %s without a job id", message.message_id)
            return
        if message.actor_name != protocol.RUN_TRAINING or len(args) != 2:
            log.warning("ignoring message %s for actor %s", message.message_id, message.actor_name)
            return
        job_id, spec = args
        run = _run_id(job_id, spec)
        if run is None:
            log.warning("ignoring run_training message %s without a job id", message.message_id)
            return
        if run in self.done:
            log.info("training %s was already run: ignoring the redelivery", run)
            return
        if self.is_cancelled(run):
            reason = "the training was cancelled before it started"
            attempt = spec.get("attempt", 1) if isinstance(spec, dict) else 1
            self.send_quietly(protocol.training_status(job_id, "Stopped", reason, attempt=attempt, seconds=0.0))
        else:
            self.current = run
            try:
                run_spec(
                    job_id,
                    spec,
                    self.work_root,
                    device=self.device,
                    send=self.send_as_worker,
                    is_cancelled=lambda: self.is_cancelled(run),
                    cache_bytes=self.cache_bytes,
                    cancel_poll_seconds=self.cancel_poll_seconds,
                    progress_seconds=self.progress_seconds,
                )
            finally:
                self.current = None
        self.remember_done(run)
        self.trainings_handled += 1
        if self.once:
            # Set before the work thread hands the batch back: once the consumer thread acks this message, it sees
            # the stop before it could read another training.
            log.info("training %s handled: stopping (--once)", run)
            self.stopping.set()
            self._wake.set()


def _run_id(job_id: Any, spec: Any) -> str | None:
    """The run a ``run_training(job_id, spec)`` message asks for: the job id, with the spec's attempt after 1."""
    if not isinstance(job_id, str) or not job_id:
        return None
    attempt = spec.get("attempt", 1) if isinstance(spec, dict) else 1
    return protocol.training_run(job_id, attempt if isinstance(attempt, int) else 1)


# --- command line ------------------------------------------------------------------------------------------------

LOCAL_KEYS = ("config", "model", "dataset", "output")


def _default_work_dir() -> Path:
    """The same default root as the inference worker's ``--models-dir``, so both share config dirs and models."""
    return Path(os.environ.get("ESD_RUNTIME_DIR", "runtime-data"))


def main_train(argv: list[str]) -> int:
    """``python -m gpu_runtime train --spec FILE``: run one training by hand, printing progress; returns the exit
    code (0 done, 1 failed, 130 cancelled with Ctrl-C).

    FILE is JSON: either a queue spec with URLs (optionally wrapped as ``{"job_id", "spec"}``), run like the worker
    would with its events printed, or the local form ``{"config", "model", "dataset", "output"}`` (paths, relative
    ones from the spec file's folder) that trains straight from disk.
    """
    parser = argparse.ArgumentParser(prog="python -m gpu_runtime train", description=main_train.__doc__)
    parser.add_argument("--spec", required=True, type=Path, help="JSON file: a queue spec or the local form")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--work-dir", type=Path, default=_default_work_dir(), help="config dirs, model cache, jobs")
    parser.add_argument("--job-id", default=None, help="job id for a queue spec (default: the spec's or the file's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    try:
        data = json.loads(args.spec.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.spec}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"error: {args.spec} must hold a JSON object", file=sys.stderr)
        return 2

    stop = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("stopping after the current step (Ctrl-C again to abort)", flush=True)
        stop.set()

    previous = (
        signal.signal(signal.SIGINT, interrupt) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        if all(key in data for key in LOCAL_KEYS) and "urls" not in data:
            return _train_local(data, args.spec.parent, args, stop)
        return _train_spec(data, args, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _train_local(data: dict, base: Path, args: argparse.Namespace, stop: threading.Event) -> int:
    """The local form: train straight from files on disk."""
    from gpu_runtime.trainer import TrainingCancelled, TrainingError, train

    paths = {}
    for key in LOCAL_KEYS:
        if not isinstance(data[key], str) or not data[key]:
            print(f"error: {key} must be a path", file=sys.stderr)
            return 2
        path = Path(data[key]).expanduser()
        paths[key] = path if path.is_absolute() else base / path

    def progress(info: dict) -> None:
        print(
            f"epoch {info['epoch']}/{info['epochs']} step {info['step']}/{info['steps']} loss {info['loss']:.4f}",
            flush=True,
        )

    try:
        result = train(
            paths["config"],
            paths["model"],
            paths["dataset"],
            paths["output"],
            device=args.device,
            on_progress=progress,
            should_stop=stop.is_set,
            work_dir=args.work_dir,
        )
    except TrainingCancelled as exc:
        print(f"cancelled: {exc}", flush=True)
        return 130
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}")
    for path in result.files:
        print(f"wrote {path}")
    print(f"done: {result.steps} steps, {result.epochs} epochs, loss {result.loss:.4f}, {result.seconds:.1f} s")
    return 0


def _train_spec(data: dict, args: argparse.Namespace, stop: threading.Event) -> int:
    """A queue spec: run it like the worker would, printing each event as a JSON line."""
    spec = data.get("spec") if isinstance(data.get("spec"), dict) else data
    job_id = args.job_id or data.get("job_id") or args.spec.stem
    final: dict = {}

    def send(event: dict) -> None:
        final.update(event)
        print(json.dumps(event), flush=True)

    run_spec(str(job_id), spec, args.work_dir, device=args.device, send=send, is_cancelled=stop.is_set)
    return {"Completed": 0, "Stopped": 130}.get(final.get("status", ""), 1)


def main_trainer(argv: list[str]) -> int:
    """``python -m gpu_runtime trainer --broker URL``: serve the training queue until SIGTERM/SIGINT, or with
    ``--once`` run one training and exit 0 (whatever the training's outcome, which goes out as its events: a
    non-zero exit would only make Kubernetes retry a Job whose message is already acked)."""
    from gpu_runtime.worker import make_broker

    parser = argparse.ArgumentParser(prog="python -m gpu_runtime trainer", description=main_trainer.__doc__)
    parser.add_argument("--broker", default=os.environ.get("DRAMATIQ_BROKER_URL", ""), help="redis:// or amqp:// URL")
    parser.add_argument("--queue", default=os.environ.get("ESD_TRAINING_QUEUE", "esd-training"))
    parser.add_argument("--events-queue", default=os.environ.get("ESD_EVENTS_QUEUE", "esd-events"))
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto")
    parser.add_argument("--work-dir", type=Path, default=_default_work_dir(), help="config dirs, model cache, jobs")
    parser.add_argument("--cache-gb", type=float, default=100.0, help="disk budget of the model cache")
    parser.add_argument("--instance-type", default=os.environ.get("ESD_INSTANCE_TYPE", ""), help="sent in heartbeats")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("ESD_METRICS_PORT", "0")),
        help="serve /metrics, /healthz and /readyz on this port (default $ESD_METRICS_PORT; 0: off)",
    )
    parser.add_argument(
        "--once", action="store_true", help="run one training, then exit (a Kubernetes Job per queued training)"
    )
    parser.add_argument(
        "--idle-exit-seconds",
        type=float,
        default=0.0,
        help="with --once: exit when no training arrived in this time (default 0: wait for one)",
    )
    args = parser.parse_args(argv)
    if not args.broker:
        parser.error("--broker (or DRAMATIQ_BROKER_URL) is required")
    if args.idle_exit_seconds and not args.once:
        parser.error("--idle-exit-seconds needs --once")
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    worker = TrainingWorker(
        make_broker(args.broker),
        args.work_dir,
        queue=args.queue,
        events_queue=args.events_queue,
        device=args.device,
        cache_bytes=int(args.cache_gb * 1024**3),
        instance_type=args.instance_type,
        once=args.once,
        idle_exit_seconds=args.idle_exit_seconds,
    )
    if args.metrics_port:
        worker.serve_metrics(args.metrics_port)
    log.info(
        "training worker on %s (events to %s, work dir %s%s)",
        args.queue,
        args.events_queue,
        args.work_dir,
        ", one training" if args.once else "",
    )
    worker.run_forever()
    return 0
