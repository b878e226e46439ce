"""A training's GPU-seconds: every end event a self-hosted trainer sends carries the seconds its run trained; a
resumed job's runs add up, a redelivered end event counts once; SageMaker's come from DescribeTrainingJob."""

import pytest

from apps.endpoints import usage
from apps.training import training
from apps.training.models import TrainingJob
from apps.training.tasks import sagemaker_gpu_seconds, worker_training_event
from esd.storage import blob_store
from tests.conftest import Api
from tests.training.test_trainings_api import native, ready  # noqa: F401 - fixture

pytestmark = pytest.mark.django_db


def event(job_id: str, status: str, attempt: int = 1, **extra) -> dict:
    """As gpu_runtime.training_worker.run_spec sends it (protocol.training_status)."""
    return {"kind": "training", "id": job_id, "status": status, "reason": "", "attempt": attempt, **extra}


def test_a_resumed_jobs_runs_add_up_and_redeliveries_count_once(api: Api, admin_key, ready):  # noqa: F811
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    worker_training_event(event(job_id, "Training", epoch=1, epochs=3, step=4, steps=12, loss=0.3))
    assert TrainingJob.objects.get(pk=job_id).gpu_seconds is None  # nothing counted while it runs

    state = {"name": "lego_lora-000001-state.pt", "kind": "state", "epoch": 1, "step": 4}
    stopped = event(job_id, "Stopped", reason="the training was cancelled (stop)", seconds=12.5, saved=[state])
    worker_training_event(stopped)
    worker_training_event(stopped)  # delivered twice (at least once): the job is already ended
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.gpu_seconds, job.gpu_seconds_by_attempt) == ("Stopped", 12.5, {"1": 12.5})

    training.resume_training(job_id, by="admin")  # attempt 2 runs the job again
    store = blob_store()
    store.put_bytes(f"kohya/train/{job_id}/output/lego_lora.safetensors", b"final")
    worker_training_event(event(job_id, "Failed", attempt=1, reason="late", seconds=99.0))  # the old run: ignored
    worker_training_event(event(job_id, "Completed", attempt=2, files=["lego_lora.safetensors"], seconds=20.0))
    worker_training_event(event(job_id, "Completed", attempt=2, files=["lego_lora.safetensors"], seconds=20.0))
    job = TrainingJob.objects.get(pk=job_id)
    assert job.status == "Completed" and job.attempt == 2
    assert job.gpu_seconds_by_attempt == {"1": 12.5, "2": 20.0} and job.gpu_seconds == 32.5

    # and the accounting counts it, on the day it ended
    report = usage.usage(usage.Period(usage.today(), usage.today()), "endpoint")
    assert {row.key: row.gpu_seconds for row in report.rows} == {"training:self-hosted": 32.5}


def test_an_end_event_without_seconds_or_with_nonsense_records_nothing(api: Api, admin_key, ready):  # noqa: F811
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    worker_training_event(event(job_id, "Failed", reason="boom", seconds="lots"))
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.gpu_seconds, job.gpu_seconds_by_attempt) == ("Failed", None, {})


def test_sagemaker_seconds_are_training_time_times_instances():
    described = {"TrainingTimeInSeconds": 600, "BillableTimeInSeconds": 1100, "ResourceConfig": {"InstanceCount": 2}}
    assert sagemaker_gpu_seconds(described) == 1200.0
    assert sagemaker_gpu_seconds({"BillableTimeInSeconds": 300}) == 300.0
    assert sagemaker_gpu_seconds({"TrainingJobStatus": "Stopped"}) is None
