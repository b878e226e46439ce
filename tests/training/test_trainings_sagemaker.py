"""Trainings on SageMaker (contract §12.1): CreateTrainingJob with the contract's hyperparameters, the monitor, and
completion from the files in the output folder — against moto's server."""

import base64
import json

import pytest

from apps.models_registry.models import Checkpoint
from apps.training.models import TrainingJob
from apps.training.tasks import monitor_sagemaker_training
from esd.aws import client
from esd.storage import blob_store
from tests.conftest import Api
from tests.endpoints.test_sagemaker_backend import aws  # noqa: F401 - fixture
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db


def body():
    return {
        "lora_train_type": "kohya",
        "params": {
            "training_params": {
                "training_instance_type": "ml.g4dn.xlarge",
                "model": "v1-5.safetensors",
                "dataset": "lego",
                "fm_type": "sd_1_5",
            },
            "config_params": {
                "saving_arguments": {"output_name": "sm_lora", "save_every_n_epochs": 1},
                "training_arguments": {"max_train_epochs": 1},
            },
        },
    }


def test_sagemaker_training_runs_and_completes(api: Api, admin_key, aws, settings):  # noqa: F811
    settings.ESD_TRAINING_BACKEND = "sagemaker"
    register("v1-5.safetensors", data=b"weights")
    api.post(
        "datasets",
        {
            "dataset_name": "lego",
            "params": {},
            "creator": "x",
            "content": [{"filename": "1.png", "name": "1.png", "type": "image", "params": {}}],
        },
        key=admin_key,
    )
    with pytest.MonkeyPatch.context() as patch:
        sent = []
        patch.setattr(monitor_sagemaker_training, "send", lambda *args: sent.append(args))
        answer = api.post("trainings", body(), key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]
    job = TrainingJob.objects.get(pk=job_id)
    assert job.sagemaker_name.startswith("kohya-") and job.status == "Starting"
    described = client("sagemaker").describe_training_job(TrainingJobName=job.sagemaker_name)
    hyper = {k: json.loads(base64.b64decode(v)) for k, v in described["HyperParameters"].items()}
    assert hyper["s3-output-path"] == f"s3://{settings.ESD_BUCKET}/kohya/train/{job_id}/output"
    assert hyper["params"]["training_id"] == job_id and hyper["training-type"] == "kohya"
    assert described["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert described["ResourceConfig"]["VolumeSizeInGB"] == 125
    listed = api.get("trainings", key=admin_key).body["data"]["trainings"][0]
    assert listed["sagemakerTrainName"] == job.sagemaker_name

    # moto completes training jobs at once and writes no artefacts: the trainer's output appears in our bucket.
    blob_store().put_bytes(f"kohya/train/{job_id}/output/sm_lora.safetensors", b"lora")
    monitor_sagemaker_training(job_id)
    job.refresh_from_db()
    assert job.status == "Completed"
    checkpoint = Checkpoint.objects.get(pk=job_id)
    assert checkpoint.status == "Active" and [f.name for f in checkpoint.files.all()] == ["sm_lora.safetensors"]


def test_sagemaker_training_without_output_fails(api: Api, admin_key, aws, settings):  # noqa: F811
    settings.ESD_TRAINING_BACKEND = "sagemaker"
    register("v1-5.safetensors", data=b"weights")
    api.post(
        "datasets",
        {
            "dataset_name": "lego",
            "params": {},
            "creator": "x",
            "content": [{"filename": "1.png", "name": "1.png", "type": "image", "params": {}}],
        },
        key=admin_key,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(monitor_sagemaker_training, "send", lambda *args: None)
        job_id = api.post("trainings", body(), key=admin_key).body["data"]["id"]
    monitor_sagemaker_training(job_id)
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.reason) == ("Failed", "training ended without output files")
    assert Checkpoint.objects.get(pk=job_id).status == "Disabled"
