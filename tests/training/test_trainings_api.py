"""Contract §9.8, §10.5: the training routes, the job/checkpoint pair, the self-hosted message and events."""

import tomllib

import dramatiq
import pytest

from apps.models_registry.models import Checkpoint
from apps.training.models import TrainingJob
from apps.training.tasks import worker_training_event
from esd.storage import blob_store
from tests.conftest import Api, make_key, make_role, make_user
from tests.models_registry.test_checkpoints import register

pytestmark = pytest.mark.django_db


@pytest.fixture
def ready(api: Api, admin_key, disk_store):
    register("v1-5.safetensors", data=b"weights")
    body = {
        "dataset_name": "lego",
        "prefix": "10_technic",
        "params": {},
        "creator": "admin",
        "content": [
            {"filename": "1.png", "name": "1.png", "type": "image", "params": {}},
            {"filename": "1.txt", "name": "1.txt", "type": "text", "params": {}},
        ],
    }
    assert api.post("datasets", body, key=admin_key).status == 201
    disk_store.put_bytes("dataset/lego/10_technic/1.png", b"png")
    disk_store.put_bytes("dataset/lego/10_technic/1.txt", b"a lego car")


def native(**changes):
    training_params = {
        "training_instance_type": "ml.g5.2xlarge",
        "model": "v1-5.safetensors",
        "dataset": "lego",
        "fm_type": "sd_1_5",
        **changes.pop("training_params", {}),
    }
    config_params = changes.pop(
        "config_params",
        {
            "saving_arguments": {"output_name": "lego_lora", "save_every_n_epochs": 1},
            "training_arguments": {"max_train_epochs": 3},
            "additional_network_arguments": {"network_dim": 8},
        },
    )
    return {
        "lora_train_type": "kohya",
        "params": {"training_params": training_params, "config_params": config_params},
        **changes,
    }


def queued_training_messages() -> list:
    broker = dramatiq.get_broker()
    queue = broker.queues.get("esd-training") if hasattr(broker, "queues") and isinstance(broker.queues, dict) else None
    return [] if queue is None else [dramatiq.Message.decode(data) for data in list(queue.queue)]


def test_create_native_form(api: Api, admin_key, ready, settings, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        answer = api.post("trainings", native(), key=admin_key)
    assert answer.status == 201, answer.body
    data = answer.body["data"]
    job_id = data["id"]
    assert data["status"] == "Starting"
    assert data["input_location"] == f"s3://{settings.ESD_BUCKET}/kohya/train/{job_id}/input"
    assert data["output_location"] == f"s3://{settings.ESD_BUCKET}/kohya/train/{job_id}/output"
    params = data["params"]
    assert params["training_type"] == "kohya"
    assert params["config_params"]["saving_arguments"]["output_name"] == "lego_lora"
    tp = params["training_params"]
    assert tp["model"] == "v1-5.safetensors" and tp["dataset"] == "lego"
    assert tp["s3_data_path"] == f"s3://{settings.ESD_BUCKET}/dataset/lego/10_technic"
    assert tp["s3_toml_path"] == f"s3://{settings.ESD_BUCKET}/kohya/train/{job_id}/input/kohya_config_cloud.toml"
    config = tomllib.loads(blob_store().read_bytes(f"kohya/train/{job_id}/input/kohya_config_cloud.toml").decode())
    assert config["saving_arguments"]["output_name"] == "lego_lora"
    assert config["training_arguments"]["max_train_epochs"] == 3
    assert config["additional_network_arguments"]["network_dim"] == 8
    assert config["optimizer_arguments"]["lr_scheduler"] == "cosine_with_restarts"  # from the template
    checkpoint = Checkpoint.objects.get(pk=job_id)
    assert (checkpoint.checkpoint_type, checkpoint.status, [f.name for f in checkpoint.files.all()]) == (
        "Lora",
        "Initial",
        ["lego_lora"],
    )
    assert checkpoint.prefix == f"kohya/train/{job_id}/output"
    [message] = [m for m in queued_training_messages() if m.args[0] == job_id] or [None]
    if message is not None:  # the in-process broker lets us look at the queue
        spec = message.args[1]
        assert message.actor_name == "run_training"
        assert spec["fm_type"] == "sd_1_5" and spec["dataset_prefix"] == "dataset/lego"
        assert set(spec["urls"]["dataset"]) == {"10_technic/1.png", "10_technic/1.txt"}
        assert set(spec["urls"]["outputs"]) == {
            "lego_lora.safetensors",
            "lego_lora-000001.safetensors",
            "lego_lora-000002.safetensors",
        }

    detail = api.get(f"trainings/{job_id}", key=admin_key).body["data"]
    assert {k: detail[k] for k in ("id", "checkpoint_id", "job_status", "model_id", "train_type")} == {
        "id": job_id,
        "checkpoint_id": job_id,
        "job_status": "Starting",
        "model_id": "kohya",
        "train_type": "Stable-diffusion",
    }
    [listed] = api.get("trainings", key=admin_key).body["data"]["trainings"]
    assert (listed["modelName"], listed["status"], listed["sagemakerTrainName"]) == ("not_applied", "Starting", None)


def test_document_form(api: Api, admin_key, ready, settings):
    model = Checkpoint.objects.get(files__name="v1-5.safetensors")
    body = {
        "lora_train_type": "kohya",
        "params": {
            "training_params": {
                "training_instance_type": "ml.g5.2xlarge",
                "fm_type": "sd_1_5",
                "s3_model_path": f"s3://{settings.ESD_BUCKET}/{model.prefix}/v1-5.safetensors",
                "s3_data_path": f"s3://{settings.ESD_BUCKET}/dataset/lego",
            },
            "config_params": {"training": {"max_train_epochs": 2, "network_dim": 4, "made_up_key": 1}},
        },
    }
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]
    output_name = f"lora_{job_id[:8]}"
    assert answer.body["data"]["params"]["config_params"]["saving_arguments"]["output_name"] == output_name
    config = tomllib.loads(blob_store().read_bytes(f"kohya/train/{job_id}/input/kohya_config_cloud.toml").decode())
    assert config["training_arguments"]["max_train_epochs"] == 2
    assert config["additional_network_arguments"]["network_dim"] == 4
    assert config["training_arguments"]["made_up_key"] == 1
    bad = {
        **body,
        "params": {
            **body["params"],
            "training_params": {
                **body["params"]["training_params"],
                "s3_data_path": f"s3://{settings.ESD_BUCKET}/elsewhere/lego",
            },
        },
    }
    assert api.post("trainings", bad, key=admin_key).body == {"statusCode": 400, "message": "Dataset not found"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (native(lora_train_type="dreambooth"), "Invalid lora train type: dreambooth, the valid value is kohya."),
        (native(training_params={"model": "nope.safetensors"}), "Model not found"),
        (native(training_params={"dataset": "nope"}), "Dataset not found"),
        (native(training_params={"fm_type": "sd_3"}), "Invalid fm_type sd_3, the valid values are sd_1_5 and sd_xl"),
        (
            native(
                config_params={
                    "saving_arguments": {"output_name": "v1-5", "save_every_n_epochs": 1},
                    "training_arguments": {"max_train_epochs": 1},
                }
            ),
            "v1-5.safetensors already exists, please use another or rename/delete exists",
        ),
    ],
)
def test_create_rules(api: Api, admin_key, ready, body, message):
    answer = api.post("trainings", body, key=admin_key)
    assert answer.body == {"statusCode": 400, "message": message}
    assert not TrainingJob.objects.exists()


def test_create_validation(api: Api, admin_key, ready):
    body = native()
    del body["params"]["config_params"]["training_arguments"]
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 400
    assert answer.body["errors"] == {
        "params.config_params.training_arguments": ['object has missing required properties (["training_arguments"])']
    }
    body = native(
        config_params={
            "saving_arguments": {"output_name": "x", "save_every_n_epochs": 0},
            "training_arguments": {"max_train_epochs": 1},
        }
    )
    assert api.post("trainings", body, key=admin_key).body["errors"] == {
        "params.config_params.saving_arguments.save_every_n_epochs": [
            "numeric instance is lower than the required minimum (minimum: 1, found: 0)"
        ]
    }


def test_same_output_name_twice_is_refused(api: Api, admin_key, ready):
    assert api.post("trainings", native(), key=admin_key).status == 201
    assert api.post("trainings", native(), key=admin_key).body["message"] == (
        "lego_lora.safetensors already exists, please use another or rename/delete exists"
    )


def test_events_complete_the_job_and_activate_the_lora(api: Api, admin_key, ready):
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    worker_training_event({"kind": "training", "id": job_id, "status": "Downloading"})
    worker_training_event(
        {
            "kind": "training",
            "id": job_id,
            "status": "Training",
            "epoch": 1,
            "epochs": 3,
            "step": 4,
            "steps": 12,
            "loss": 0.25,
        }
    )
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.progress["step"], job.losses) == ("Training", 4, [[4, 0.25]])
    store = blob_store()
    store.put_bytes(f"kohya/train/{job_id}/output/lego_lora-000001.safetensors", b"epoch")
    store.put_bytes(f"kohya/train/{job_id}/output/lego_lora.safetensors", b"final")
    worker_training_event({"kind": "training", "id": job_id, "status": "Completed", "warnings": ["ignored x"]})
    job.refresh_from_db()
    assert (job.status, job.log) == ("Completed", ["ignored x"])
    checkpoint = Checkpoint.objects.get(pk=job_id)
    assert checkpoint.status == "Active"
    assert [f.name for f in checkpoint.files.all()] == ["lego_lora.safetensors", "lego_lora-000001.safetensors"]
    # a late event changes nothing; deleting the completed job keeps its LoRA
    worker_training_event({"kind": "training", "id": job_id, "status": "Failed", "reason": "late"})
    assert TrainingJob.objects.get(pk=job_id).status == "Completed"
    assert api.delete("trainings", {"training_id_list": [job_id]}, key=admin_key).status == 204
    assert not TrainingJob.objects.exists() and Checkpoint.objects.get(pk=job_id).status == "Active"
    assert store.exists(f"kohya/train/{job_id}/output/lego_lora.safetensors")


def test_completion_without_files_fails_and_disables(api: Api, admin_key, ready):
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    worker_training_event({"kind": "training", "id": job_id, "status": "Completed"})
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.reason) == ("Failed", "training ended without output files")
    assert api.get(f"trainings/{job_id}", key=admin_key).body["data"]["params"]["resp"] == job.reason
    assert Checkpoint.objects.get(pk=job_id).status == "Disabled"


def test_delete_unfinished_removes_output_and_checkpoint_and_cancels(api: Api, admin_key, ready):
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    store = blob_store()
    store.put_bytes(f"kohya/train/{job_id}/output/lego_lora-000001.safetensors", b"partial")
    assert api.delete("trainings", {"training_id_list": [job_id, "junk"]}, key=admin_key).status == 204
    assert not TrainingJob.objects.exists() and not Checkpoint.objects.filter(pk=job_id).exists()
    assert list(store.list(f"kohya/train/{job_id}/output/")) == []
    assert list(store.list(f"kohya/train/{job_id}/input/")) == []
    assert store.exists(f"kohya/train/{job_id}/cancel")  # a running worker sees it and stops


def test_visibility_and_permissions(api: Api, admin_key, ready, outsider_key):
    job_id = api.post("trainings", native(), key=admin_key).body["data"]["id"]
    make_role("Trainers", ["train:all"])
    other = make_key(make_user("tina", roles=("Trainers",)))
    assert api.get(f"trainings/{job_id}", key=other).body == {
        "statusCode": 404,
        "message": f"Job with id {job_id} not found",
    }
    assert api.get("trainings", key=other).body["data"]["trainings"] == []
    assert api.get("trainings", key=outsider_key).body == {
        "statusCode": 403,
        "message": "User outsider has no permissions: ['train:all']",
    }
