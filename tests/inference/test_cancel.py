"""Cancelling inference jobs and their progress in the API (additions beyond ESD): the API, the broker, a real
gpu_runtime worker on the tiny model, the local store over HTTP and result ingestion - nothing stubbed.

The tiny model makes a 64x64 step in a few to tens of milliseconds on a CPU, depending on the machine: every step
here is paced to take at least ``STEP_SECONDS`` (the ``paced`` fixture), so a 50-step job runs for a few seconds on
any machine - long enough to be cancelled at about step 10 and to report several throttled progress events, short
enough to finish when it is not. Only the pace is changed: the real engine runs every step.
"""

from __future__ import annotations

import json
import time

import pytest

from apps.inference.models import InferenceJob
from apps.inference.tasks import worker_result
from esd import keys
from esd.storage import blob_store
from tests.conftest import Api, make_key, make_role, make_user, wait_until
from tests.inference.test_inference_sagemaker import (  # noqa: F401 (fixtures)
    OUTPUT,
    aws,
    checkpoint,
    queue_async,
    read_s3,
    sagemaker_endpoint,
)

pytestmark = pytest.mark.django_db(transaction=True)

MODELS = {"Stable-diffusion": ["tiny.safetensors"], "VAE": ["Automatic"]}
LONG = {"prompt": "a photo of a cat", "seed": 7, "steps": 50, "width": 64, "height": 64, "sampler_name": "Euler"}
SHORT = {**LONG, "steps": 3, "seed": 8}
ESD_DETAIL_FIELDS = {
    "InferenceJobId",
    "status",
    "taskType",
    "inference_type",
    "owner_group_or_role",
    "createTime",
    "startTime",
    "completeTime",
    "image_names",
    "inference_info_name",
    "sagemakerRaw",
    "payload_string",
    "params",
    "img_presigned_urls",
    "output_presigned_urls",
}


STEP_SECONDS = 0.04


@pytest.fixture(autouse=True)
def paced(request):
    """The shared engine's steps take at least ``STEP_SECONDS`` each (a pause in its progress callback), so what
    these tests see of a running job does not depend on how fast the machine is (tests with workers only)."""
    if "endpoints" not in request.fixturenames:
        yield
        return
    engine = request.getfixturevalue("gpu").engine
    original = engine.run

    def run(jobs, progress=None, stop=None):
        def slowed(step: int, steps: int) -> None:
            time.sleep(STEP_SECONDS)
            if progress is not None:
                progress(step, steps)

        return original(jobs, slowed, stop)

    engine.run = run
    yield
    engine.run = original


def start(api: Api, key: str, endpoint: str, params: dict) -> str:
    """One-call Async job on the named endpoint: 202, in progress."""
    answer = api.post(
        "inferences",
        {
            "task_type": "txt2img",
            "inference_type": "Async",
            "models": MODELS,
            "sagemaker_endpoint_name": endpoint,
            "payload_string": json.dumps(params),
        },
        key=key,
    )
    assert answer.status == 202, answer.body
    return answer.body["data"]["inference"]["inference_id"]


def get(api: Api, key: str, job_id: str) -> dict:
    answer = api.get(f"inferences/{job_id}", key=key)
    assert answer.status == 200, answer.body
    return answer.body["data"]


def finished(api: Api, key: str, job_id: str, timeout: float = 120) -> dict:
    return wait_until(
        lambda: (d := get(api, key, job_id))["status"] in ("succeed", "failed") and d, timeout=timeout, interval=0.1
    )


def at_step(api: Api, key: str, job_id: str, step: int) -> dict:
    """The job once a worker has reported at least ``step`` (it is running, not queued)."""
    return wait_until(
        lambda: (d := get(api, key, job_id))["progress"]["step"] >= step and d,
        timeout=120,
        interval=0.02,
    )


def output_uploaded(job_id: str) -> bool:
    return blob_store().exists(keys.raw_output(job_id))


def test_a_running_job_stops_between_steps_and_the_worker_goes_on(api: Api, admin_key, endpoints):
    endpoint = endpoints["Async"]
    job_id = start(api, admin_key, endpoint, LONG)
    running = at_step(api, admin_key, job_id, 8)
    assert running["status"] == "inprogress" and running["queue_position"] is None
    assert running["progress"]["total"] == 50

    answer = api.put(f"inferences/{job_id}/cancel", key=admin_key)
    assert answer.status == 200, answer.body
    data = answer.body["data"]
    assert data["status"] == "failed" and data["completeTime"] is not None
    assert data["sagemakerRaw"] == {"error": "cancelled by admin"}
    assert data["progress"]["eta_seconds"] is None  # nothing is left to wait for

    # the worker stops the call and takes the next job: it succeeds
    nxt = start(api, admin_key, endpoint, SHORT)
    done = finished(api, admin_key, nxt)
    assert done["status"] == "succeed", done["sagemakerRaw"]
    assert done["image_names"] == ["image_0.png"]
    # the worker reported where it stopped (a final progress event) and uploaded nothing for the cancelled job
    stopped = get(api, admin_key, job_id)
    assert stopped["status"] == "failed" and stopped["sagemakerRaw"] == {"error": "cancelled by admin"}
    assert 8 <= stopped["progress"]["step"] < 50, stopped["progress"]
    assert not output_uploaded(job_id)
    assert stopped["image_names"] == [] and stopped["img_presigned_urls"] == []
    # the worker time it used until it stopped is accounted (from the worker's final event), once
    used = wait_until(lambda: get(api, admin_key, job_id)["gpu_seconds"])
    assert used >= 8 * STEP_SECONDS, used  # at least the paced steps it ran

    # a worker that finished the job before it saw the cancel: its late output is removed, the job stays cancelled
    blob_store().put_bytes(keys.raw_output(job_id), json.dumps(OUTPUT).encode())
    worker_result({"inferenceId": job_id, "invocationStatus": "Completed"})
    assert not output_uploaded(job_id) and list(blob_store().list(f"out/{job_id}/")) == []
    assert get(api, admin_key, job_id)["sagemakerRaw"] == {"error": "cancelled by admin"}

    # cancelling it again, or a job that succeeded: 400, nothing changes
    for ended, status in ((job_id, "failed"), (nxt, "succeed")):
        again = api.put(f"inferences/{ended}/cancel", key=admin_key)
        assert (again.status, again.body) == (
            400,
            {"statusCode": 400, "message": f"inference job {ended} has already ended with status {status}"},
        )
    assert get(api, admin_key, nxt)["status"] == "succeed"


def test_a_queued_job_is_failed_at_once_and_never_runs(api: Api, admin_key, endpoints):
    endpoint = endpoints["Async"]
    first = start(api, admin_key, endpoint, LONG)
    at_step(api, admin_key, first, 1)
    queued = start(api, admin_key, endpoint, SHORT)
    behind = start(api, admin_key, endpoint, {**SHORT, "seed": 9})
    assert get(api, admin_key, queued)["queue_position"] == 0
    assert get(api, admin_key, behind)["queue_position"] == 1
    assert get(api, admin_key, queued)["progress"] == {"step": 0, "total": 0, "eta_seconds": None}

    answer = api.put(f"inferences/{queued}/cancel", key=admin_key)
    assert answer.status == 200, answer.body
    assert answer.body["data"]["status"] == "failed"
    assert answer.body["data"]["sagemakerRaw"] == {"error": "cancelled by admin"}
    assert answer.body["data"]["queue_position"] is None
    assert get(api, admin_key, behind)["queue_position"] == 0  # the cancelled job no longer counts

    # the first job and the one behind run; the cancelled one is skipped by the worker
    assert finished(api, admin_key, first)["status"] == "succeed"
    assert finished(api, admin_key, behind)["status"] == "succeed"
    job = InferenceJob.objects.get(pk=queued)
    assert job.worker_started is None  # no worker ever took it up
    assert (job.progress_step, job.progress_steps) == (0, 0)
    assert not output_uploaded(queued)
    assert job.status == "failed" and job.sagemaker_raw == {"error": "cancelled by admin"}


def test_a_batched_call_goes_on_for_the_job_not_cancelled(api: Api, admin_key, endpoints, gpu):
    endpoint = endpoints["Async"]
    # the worker behind the endpoint, to see which jobs share an engine call (the real engine runs them)
    engine = next(w for w in gpu.started if w.endpoint == endpoint).engine
    calls: list[list[str]] = []
    original = engine.run

    def recording(jobs, progress=None, stop=None):
        calls.append([job.job_id for job in jobs])
        return original(jobs, progress, stop)

    engine.run = recording
    try:
        blocker = start(api, admin_key, endpoint, LONG)
        at_step(api, admin_key, blocker, 1)
        # queued together behind the blocker, compatible: the worker takes them as one batched call
        kept = start(api, admin_key, endpoint, {**LONG, "prompt": "a red dog", "seed": 11})
        dropped = start(api, admin_key, endpoint, {**LONG, "prompt": "a blue bird", "seed": 12})
        wait_until(lambda: get(api, admin_key, dropped)["queue_position"] == 1)
        assert api.put(f"inferences/{blocker}/cancel", key=admin_key).status == 200
        at_step(api, admin_key, dropped, 5)
        answer = api.put(f"inferences/{dropped}/cancel", key=admin_key)
        assert answer.status == 200 and answer.body["data"]["sagemakerRaw"] == {"error": "cancelled by admin"}
        done = finished(api, admin_key, kept)
    finally:
        engine.run = original
    assert done["status"] == "succeed", done["sagemakerRaw"]
    assert done["image_names"] == ["image_0.png"] and done["progress"] == {"step": 50, "total": 50, "eta_seconds": 0.0}
    assert [blocker] in calls and [kept, dropped] in calls
    assert not output_uploaded(dropped) and not output_uploaded(blocker)
    job = InferenceJob.objects.get(pk=dropped)
    assert job.status == "failed" and job.sagemaker_raw == {"error": "cancelled by admin"}
    assert job.progress_step < 50  # it got no progress after its cancel was seen


def test_progress_moves_monotonically_in_get(api: Api, admin_key, endpoints):
    job_id = start(api, admin_key, endpoints["Async"], LONG)
    polls = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        data = get(api, admin_key, job_id)
        polls.append((data["status"], data["progress"], data["queue_position"]))
        if data["status"] in ("succeed", "failed"):
            break
        time.sleep(0.05)
    assert polls[-1][0] == "succeed"
    reported = [progress for _, progress, _ in polls if progress["total"]]
    steps = [p["step"] for p in reported]
    assert steps == sorted(steps) and len(set(steps)) >= 3, steps
    assert {p["total"] for p in reported} == {50}
    running = [(p, position) for status, p, position in polls if status == "inprogress" and p["total"]]
    assert all(position is None for _, position in running)  # a job a worker has taken is not queued
    first_step = running[0][0]["step"]
    later = [p for p, _ in running if p["step"] > first_step]
    assert later and all(isinstance(p["eta_seconds"], float) and p["eta_seconds"] >= 0 for p in later)
    assert polls[-1][1] == {"step": 50, "total": 50, "eta_seconds": 0.0}


def test_delete_cancels_a_job_in_progress_first(api: Api, admin_key, endpoints):
    endpoint = endpoints["Async"]
    job_id = start(api, admin_key, endpoint, LONG)
    at_step(api, admin_key, job_id, 5)
    assert api.delete("inferences", {"inference_id_list": [job_id]}, key=admin_key).status == 204
    assert not InferenceJob.objects.filter(pk=job_id).exists()
    nxt = start(api, admin_key, endpoint, SHORT)
    assert finished(api, admin_key, nxt)["status"] == "succeed"
    assert not output_uploaded(job_id)  # the worker stopped it: no late result came


def test_cancel_permissions_visibility_and_created_jobs(api: Api, admin_key, designer_key, endpoints):
    created = api.post(
        "inferences", {"task_type": "txt2img", "inference_type": "Async", "models": MODELS}, key=admin_key
    )
    assert created.status == 201, created.body
    job_id = created.body["data"]["inference"]["id"]
    make_role("Readers", ["inference:list"])
    make_role("Creators", ["inference:create"])
    reader = make_user("reader", roles=("Readers",))
    answer = api.put(f"inferences/{job_id}/cancel", key=make_key(reader))
    assert (answer.status, answer.body) == (
        403,
        {"statusCode": 403, "message": "User reader has no permissions: ['inference:all', 'inference:create']"},
    )
    # inference:create without inference:all: another user's job is not visible
    stranger = make_user("stranger", roles=("Creators",))
    answer = api.put(f"inferences/{job_id}/cancel", key=make_key(stranger))
    assert (answer.status, answer.body) == (404, {"statusCode": 404, "message": f"InferenceJobId {job_id} not found"})
    answer = api.put("inferences/no-such-job/cancel", key=admin_key)
    assert (answer.status, answer.body) == (404, {"statusCode": 404, "message": "InferenceJobId no-such-job not found"})
    assert get(api, admin_key, job_id)["status"] == "created"

    # inference:all sees every job: the Designer (holding it) cancels the admin's created job
    answer = api.put(f"inferences/{job_id}/cancel", key=designer_key)
    assert answer.status == 200, answer.body
    assert answer.body["data"]["status"] == "failed"
    assert answer.body["data"]["sagemakerRaw"] == {"error": "cancelled by designer"}
    started = api.put(f"inferences/{job_id}/start", key=admin_key)
    assert (started.status, started.body["message"]) == (400, f"inference job {job_id} has already been started")


def test_esd_fields_unchanged_and_only_additions(api: Api, admin_key, endpoints):
    job_id = start(api, admin_key, endpoints["Async"], SHORT)
    data = finished(api, admin_key, job_id)
    assert set(data) == ESD_DETAIL_FIELDS | {"progress", "queue_position", "gpu_seconds"}
    listed = api.get("inferences", key=admin_key).body["data"]["inferences"]
    assert set(next(j for j in listed if j["InferenceJobId"] == job_id)) == ESD_DETAIL_FIELDS - {
        "img_presigned_urls",
        "output_presigned_urls",
    }


def test_sagemaker_cancel_drops_the_result_when_it_arrives(api: Api, admin_key, aws, checkpoint, moto_server, worker):  # noqa: F811
    from apps.inference import services
    from apps.inference.tasks import sweep_inferences

    sagemaker_endpoint(api, admin_key, "Async", "as")
    queue_async(moto_server, json.dumps(OUTPUT))
    answer = api.post(
        "inferences",
        {"task_type": "txt2img", "inference_type": "Async", "models": MODELS, "payload_string": json.dumps(SHORT)},
        key=admin_key,
    )
    assert answer.status == 202, answer.body
    job_id = answer.body["data"]["inference"]["inference_id"]
    cancelled = api.put(f"inferences/{job_id}/cancel", key=admin_key)
    assert cancelled.status == 200 and cancelled.body["data"]["sagemakerRaw"] == {"error": "cancelled by admin"}
    job = InferenceJob.objects.get(pk=job_id)
    raw = read_s3(job.output_location)  # SageMaker wrote the output: it is not ingested
    sweep_inferences()
    services.ingest_output(job_id, raw)
    data = get(api, admin_key, job_id)
    assert data["status"] == "failed" and data["image_names"] == []
    assert data["sagemakerRaw"] == {"error": "cancelled by admin"}
    assert list(aws.list(f"out/{job_id}/")) == []


def running_job() -> InferenceJob:
    """A self-hosted job a worker is running, as the services see it (for races set up by hand)."""
    from django.utils import timezone

    return InferenceJob.objects.create(
        task_type="txt2img",
        inference_type="Async",
        owner="admin",
        endpoint_name="esd-async-x",
        backend="self-hosted",
        status="inprogress",
        start_time=timezone.now(),
    )


def test_an_ingestion_racing_the_cancel_leaves_nothing_and_accounts_once(monkeypatch):
    """The worker's result is being stored when the cancel lands (after the images, before the job's row): the
    job stays cancelled, what was stored is removed, and the worker time is recorded once."""
    from django.utils import timezone

    from apps.inference import services

    job = running_job()
    job_id = str(job.id)
    store = blob_store()
    store.put_bytes(keys.raw_output(job_id), json.dumps(OUTPUT).encode())
    original = store.put_bytes

    def cancel_meanwhile(key: str, data: bytes) -> None:
        original(key, data)
        if key == keys.result_params(job_id):  # the images and the param file are stored: the cancel comes now
            services.cancel_job(InferenceJob.objects.get(pk=job_id), "admin")

    monkeypatch.setattr(store, "put_bytes", cancel_meanwhile)
    arrival = services.Arrival(timezone.now(), run_seconds=2.0, gpu_seconds=1.5)
    services.ingest_output(job_id, store.read_bytes(keys.raw_output(job_id)), arrival)
    job.refresh_from_db()
    assert job.status == "failed" and job.sagemaker_raw == {"error": "cancelled by admin"}
    assert job.image_names == [] and job.gpu_seconds == 1.5
    assert list(store.list(f"out/{job_id}/")) == [] and not output_uploaded(job_id)

    # the same result again, or a failure report, changes nothing more
    services.ingest_output(job_id, json.dumps(OUTPUT).encode(), services.Arrival(timezone.now(), gpu_seconds=9.0))
    services.fail_job(job_id, {"error": "late"}, services.Arrival(timezone.now(), gpu_seconds=7.0))
    job.refresh_from_db()
    assert job.gpu_seconds == 1.5 and job.sagemaker_raw == {"error": "cancelled by admin"}
    assert list(store.list(f"out/{job_id}/")) == [] and not output_uploaded(job_id)


def test_a_worker_reporting_its_stop_at_once_waits_for_the_cancel(monkeypatch):
    """The worker sees the marker and reports ``cancelled at step 3`` while ``cancel_job`` is still writing it: the
    report waits for the cancel's row lock, so the cancel answers with the job cancelled by its user (PostgreSQL;
    SQLite has no row locks, and the embedded mode's events run in the same process)."""
    import threading

    from django.db import connection

    from apps.inference import services

    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL (CI's second pass)")
    job = running_job()
    job_id = str(job.id)
    store = blob_store()
    original = store.put_bytes
    reports: list[threading.Thread] = []

    def report_stop() -> None:
        try:
            services.fail_job(job_id, {"error": "cancelled at step 3 of 50"})
        finally:
            connection.close()

    def marker_then_report(key: str, data: bytes) -> None:
        original(key, data)
        if key == services.cancel_marker(job):  # the worker polls it now and reports its stop
            reports.append(threading.Thread(target=report_stop))
            reports[0].start()
            reports[0].join(timeout=1)  # blocked on the row lock (without it, it would end the job here)

    monkeypatch.setattr(store, "put_bytes", marker_then_report)
    cancelled = services.cancel_job(job, "admin")
    reports[0].join(timeout=30)
    assert not reports[0].is_alive()
    assert cancelled.status == "failed" and cancelled.sagemaker_raw == {"error": "cancelled by admin"}
    job.refresh_from_db()
    assert job.sagemaker_raw == {"error": "cancelled by admin"}  # the worker's later report changed nothing
