"""The GPU worker: consumes an endpoint's queue, runs jobs, reports on the events queue (contract §12.2).

It reads the queue through dramatiq's consumer API rather than running a dramatiq ``Worker`` so that it can take
several queued messages at once and run compatible txt2img jobs as one batched pipeline call; receiving, running
and heartbeats are separate threads (:mod:`gpu_runtime.service`) so the broker connection stays serviced during a
long job and is re-created when it is lost. It needs no database and no storage credentials: everything a job
needs arrives as presigned URLs in its message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import dramatiq

from gpu_runtime import metrics, protocol, transfer
from gpu_runtime.errors import JobCancelled, JobError
from gpu_runtime.service import HEARTBEAT_SECONDS, CancelWatch, QueueService

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 0.5
CANCEL_POLL_SECONDS = 1.0  # a running job's look at its cancel marker (the cancel message is seen at once)
REMEMBERED_CANCELS = 10000


def make_broker(url: str) -> dramatiq.Broker:
    """The broker of a ``redis://`` or ``amqp://`` URL (the control plane's ``DRAMATIQ_BROKER_URL``)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url, middleware=[])
    if url.startswith(("amqp://", "amqps://")):
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=url, middleware=[])
    raise SystemExit(f"--broker must be a redis:// or amqp:// URL, got {url!r}")


class GpuWorker(QueueService):
    """Serves one endpoint's queue with one engine, one batch at a time.

    The consumer thread receives (prefetch = ``max_batch``, so queued compatible jobs arrive together), the work
    thread prepares and runs them, the heartbeat thread reports the worker while the consumer is healthy (see
    :mod:`gpu_runtime.service`).

    Cancelling: ``cancel_inference(job_id)`` on the endpoint's queue is handled on the consumer thread at once
    (:meth:`inline`) and marks the id; the request's ``urls.cancel`` marker is looked at once before a job runs and
    polled every second while it runs (the message may be queued behind others). A job cancelled before it runs
    is skipped; a running one stops between two denoising steps - or, in a batched call, the call goes on for the
    other jobs and only the cancelled job's result is dropped. Either way the cancelled job's output is not
    uploaded and it is reported ``Failed`` with the step it stopped at.
    """

    thread_prefix = "gpu-worker"

    def __init__(
        self,
        broker: dramatiq.Broker,
        engine: Any,
        endpoint: str,
        *,
        events_queue: str = "esd-events",
        instance_type: str = "",
        worker_id: str | None = None,
        max_batch: int = 8,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        poll_ms: int = 20,
        cancel_poll_seconds: float = CANCEL_POLL_SECONDS,
    ):
        super().__init__(
            broker,
            events_queue,
            queue_name=endpoint,
            prefetch=max_batch,
            max_batch=max_batch,
            poll_ms=poll_ms,
            heartbeat_seconds=heartbeat_seconds,
            worker_id=worker_id,
            instance_type=instance_type,
        )
        self.engine = engine
        self.endpoint = endpoint
        self.cancel_poll_seconds = cancel_poll_seconds
        self.cancel_lock = threading.Lock()
        self.cancelled: OrderedDict[str, None] = OrderedDict()  # ids a cancel message named (bounded)
        # What the console shows for this worker; engines without a policy (test doubles) report none.
        describe = getattr(engine, "capabilities", None)
        self.capabilities = protocol.capability_summary(describe()) if describe else None

    def readiness(self) -> dict[str, str | None]:
        """The service's checks plus the engine's device: a CUDA worker whose GPU has gone cannot take a job."""
        checks = super().readiness()
        device = str(getattr(self.engine, "device", "cpu"))
        problem = None
        if device.startswith("cuda"):
            try:
                import torch

                if not torch.cuda.is_available():
                    problem = f"the engine's device {device} is not available"
                else:
                    torch.cuda.mem_get_info(torch.device(device))
            except Exception as exc:
                problem = f"the engine's device {device} does not answer: {type(exc).__name__}: {exc}"
        checks["engine"] = problem
        return checks

    # --- events ----------------------------------------------------------------------------------------------------
    def _heartbeat_event(self) -> dict:
        """The one place that builds this worker's heartbeat (the endpoint counts live workers from these)."""
        return protocol.heartbeat(self.endpoint, self.worker_id, self.instance_type, self.capabilities)

    # --- jobs ------------------------------------------------------------------------------------------------------
    def job_id(self, message: Any) -> str | None:
        """The inference id of a ``run_inference`` message (None for anything else: it is ignored with a log)."""
        if message.actor_name != protocol.RUN_INFERENCE or len(message.args) != 2:
            return None
        job_id = message.args[0]
        return job_id if isinstance(job_id, str) and job_id else None

    def run_batch(self, messages: list[Any]) -> None:
        """The work thread's entry point: one batch of received messages."""
        self.handle(messages)

    # --- cancelling ------------------------------------------------------------------------------------------------
    def inline(self, message: Any) -> bool:
        """A ``cancel_inference`` message is handled on the consumer thread at once: it must reach the running job,
        not wait behind it."""
        if message.actor_name != protocol.CANCEL_INFERENCE:
            return False
        try:
            self.cancel(protocol.validate_cancel(tuple(message.args or ())))
        except protocol.ProtocolError as exc:
            log.warning("ignoring cancel message %s: %s", message.message_id, exc)
        return True

    def cancel(self, job_id: str) -> None:
        """Mark a job cancelled: a running one stops at its next step, a later delivery is skipped."""
        with self.cancel_lock:
            self.cancelled[job_id] = None
            while len(self.cancelled) > REMEMBERED_CANCELS:
                self.cancelled.popitem(last=False)
        log.info("inference %s: cancel requested", job_id)

    def is_cancelled(self, job_id: str) -> bool:
        """Whether a cancel message named this job (thread-safe: the work thread asks between steps)."""
        with self.cancel_lock:
            return job_id in self.cancelled

    def _watch(self, job_id: str, request: Any) -> CancelWatch:
        """The job's cancel check: this worker's flag, or its marker in storage (``urls.cancel``)."""
        url = (request.get("urls") or {}).get("cancel") if isinstance(request, dict) else None
        return CancelWatch(
            url, lambda: self.is_cancelled(job_id), self.cancel_poll_seconds, name=f"inference-cancel-{job_id[:8]}"
        )

    def _report_cancelled(
        self, job_id: str, step: int, steps: int, picked: float | None = None, busy: float | None = None
    ) -> None:
        """A cancelled job: nothing is uploaded; its last step and a ``Failed`` event with the reason are sent, with
        the worker time it used until it stopped (``busy``: the GPU was held for it, so it is accounted)."""
        if steps:
            self.send_quietly(protocol.progress(job_id, min(step, steps), steps))
        reason = f"cancelled at step {step} of {steps}" if steps else "cancelled before it ran"
        log.info("inference %s %s", job_id, reason)
        run_seconds = time.monotonic() - picked if picked is not None else None
        self.send_quietly(
            protocol.inference_result(job_id, ok=False, reason=reason, run_seconds=run_seconds, gpu_seconds=busy)
        )
        self.remember_done(job_id)

    def handle(self, messages: list[Any]) -> None:
        """Prepare every job, run compatible ones together, report each. Nothing here may kill the worker.

        The batch was picked up now: each job's run time counts from here, and its worker time (GPU-seconds) is
        its own preparation plus its share, by images, of the engine call it ran in."""
        picked = time.monotonic()
        groups: OrderedDict[Any, list] = OrderedDict()
        for message in messages:
            job_id, request = self._unpack(message)
            if job_id is None or job_id in self.done:
                continue
            began = time.monotonic()
            watch = self._watch(job_id, request)
            if watch() or watch.poll():  # cancelled while queued: never runs
                self._report_cancelled(job_id, 0, 0)
                continue
            self.send_quietly(protocol.started(job_id, self.worker_id))
            try:
                protocol.validate_request(request)
                prepared = self.engine.prepare(job_id, request)
            except (JobError, protocol.ProtocolError, ValueError) as exc:
                metrics.ERRORS.labels(self.queue, "rejected").inc()
                self._finish(
                    job_id, request, {"error": str(exc)}, ok=False, picked=picked, busy=time.monotonic() - began
                )
                continue
            except Exception as exc:
                log.exception("job %s could not be prepared", job_id)
                metrics.ERRORS.labels(self.queue, "internal").inc()
                output = {"error": f"internal error: {type(exc).__name__}: {exc}"}
                self._finish(job_id, request, output, ok=False, picked=picked, busy=time.monotonic() - began)
                continue
            key = prepared.batch_key() or ("solo", job_id)
            groups.setdefault(key, []).append((prepared, request, time.monotonic() - began))
        for group in groups.values():
            self._run(group, picked)

    def _run(self, group: list[tuple[Any, dict, float]], picked: float) -> None:
        """One engine call for a group of compatible jobs; progress is throttled, every job gets its own result.

        The engine asks ``stop`` after every step: it answers True once every job of the call is cancelled. A job
        cancelled while the others go on gets no more progress events, and its result is dropped."""
        jobs = [prepared for prepared, _, _ in group]
        watches = {prepared.job_id: self._watch(prepared.job_id, request) for prepared, request, _ in group}
        last = [0.0]
        iterations = [0]
        at = [0, 0]  # the last step of the call
        stopped_at: dict[str, tuple[int, int]] = {}  # where each cancelled job was when its cancel was seen

        def progress(step: int, steps: int) -> None:
            iterations[0] = max(iterations[0], steps if step == steps else 0)
            at[:] = [step, steps]
            now = time.monotonic()
            throttled = not (step == steps or now - last[0] >= PROGRESS_EVERY_SECONDS)
            if not throttled:
                last[0] = now
            for job in jobs:
                if watches[job.job_id]():
                    stopped_at.setdefault(job.job_id, (step, steps))
                elif not throttled:
                    self.send_quietly(protocol.progress(job.job_id, step, steps))

        def stop() -> bool:
            return all(watch() for watch in watches.values())

        for watch in watches.values():
            watch.start()
        began = time.monotonic()
        raised = True
        try:
            outputs = self.engine.run(jobs, progress, stop)
            raised = False
        except JobCancelled:
            outputs = [{"error": "cancelled"}] * len(jobs)
        except JobError as exc:
            metrics.ERRORS.labels(self.queue, "job").inc()
            outputs = [{"error": str(exc)}] * len(jobs)
        except Exception as exc:
            log.exception("jobs %s failed", [job.job_id for job in jobs])
            metrics.ERRORS.labels(self.queue, "internal").inc()
            outputs = [{"error": f"internal error: {type(exc).__name__}: {exc}"}] * len(jobs)
        finally:
            for watch in watches.values():
                watch.stop()
        elapsed = time.monotonic() - began
        weights = [max(1, len(getattr(job, "prompts", None) or ())) for job in jobs]
        metrics.BATCH_SIZE.labels(self.queue).observe(sum(weights))
        if iterations[0] and elapsed > 0:
            metrics.ITERATIONS.labels(self.queue).inc(iterations[0])
            metrics.ITERATIONS_PER_SECOND.labels(self.queue).set(iterations[0] / elapsed)
        for (prepared, request, prepare_seconds), output, weight in zip(group, outputs, weights, strict=True):
            share = prepare_seconds + elapsed * weight / sum(weights)
            if watches[prepared.job_id]():
                step, steps = stopped_at.get(prepared.job_id, (at[0], at[1]))
                self._report_cancelled(prepared.job_id, step, steps, picked, share)
                continue
            if "error" in output and not raised:  # the engine failed this job alone
                metrics.ERRORS.labels(self.queue, "job").inc()
            self._finish(prepared.job_id, request, output, ok="error" not in output, picked=picked, busy=share)

    def _unpack(self, message: Any) -> tuple[str | None, Any]:
        """(job id, request) of a ``run_inference`` message; anything else is logged and skipped, never fatal."""
        if message.actor_name != protocol.RUN_INFERENCE or len(message.args) != 2:
            log.warning("ignoring message %s for actor %s", message.message_id, message.actor_name)
            return None, None
        job_id, request = message.args
        return (job_id if isinstance(job_id, str) and job_id else None), request

    def _finish(self, job_id: str, request: Any, output: dict, *, ok: bool, picked: float, busy: float) -> None:
        """PUT the raw output where the server reads it, then say so on the events queue (with the job's run time
        since ``picked`` and its ``busy`` worker seconds)."""
        url = (request.get("urls") or {}).get("output") if isinstance(request, dict) else None
        reason = output.get("error", "") if not ok else ""
        location = url.split("?", 1)[0] if url else ""
        if url:
            try:
                transfer.put(url, json.dumps(output).encode(), "the output", "application/json")
            except JobError as exc:
                log.warning("could not upload the output of job %s: %s", job_id, exc)
                metrics.ERRORS.labels(self.queue, "upload").inc()
                ok, reason, location = False, str(exc), ""
            except Exception as exc:
                log.exception("could not upload the output of job %s", job_id)
                metrics.ERRORS.labels(self.queue, "upload").inc()
                ok, reason, location = False, f"uploading the output failed: {exc}", ""
        run_seconds = time.monotonic() - picked
        metrics.JOBS.labels(self.queue, "ok" if ok else "failed").inc()
        metrics.RUN_SECONDS.labels(self.queue).observe(run_seconds)
        if ok and isinstance(output.get("images"), list):
            metrics.IMAGES.labels(self.queue).inc(len(output["images"]))
        event = protocol.inference_result(
            job_id, ok=ok, output_location=location, reason=reason, run_seconds=run_seconds, gpu_seconds=busy
        )
        self.send_quietly(event)
        self.remember_done(job_id)
