"""LoRA training end to end on the tiny model: a dataset uploaded through presigned URLs, ``POST /trainings``, the
real gpu_runtime trainer on the training queue (through the configured broker), the LoRA checkpoint Active, and an
inference with ``<lora:...>`` that differs from one without it."""

import json

import pytest
import requests
from safetensors import safe_open

from apps.models_registry.models import Checkpoint
from apps.training.models import TrainingJob
from esd.storage import blob_store
from tests.conftest import Api, wait_until
from tests.training.conftest import png

pytestmark = pytest.mark.django_db(transaction=True)


def test_train_a_lora_and_use_it(api: Api, admin_key, endpoints, trainer):
    content = [
        {"filename": f"{i}.{ext}", "name": f"{i}.{ext}", "type": "image" if ext == "png" else "text", "params": {}}
        for i in range(3)
        for ext in ("png", "txt")
    ]
    created = api.post(
        "datasets",
        {"dataset_name": "blobs", "prefix": "2_blob", "params": {}, "creator": "admin", "content": content},
        key=admin_key,
    )
    assert created.status == 201, created.body
    for name, url in created.body["data"]["s3PresignUrl"].items():
        data = png(int(name[0])) if name.endswith(".png") else b"a photo of a blob"
        assert requests.put(url, data=data, timeout=30).status_code == 200
    assert api.put("datasets/blobs", {"status": "Enabled"}, key=admin_key).status == 200

    body = {
        "lora_train_type": "kohya",
        "params": {
            "training_params": {
                "training_instance_type": "cpu",
                "model": "tiny.safetensors",
                "dataset": "blobs",
                "fm_type": "sd_1_5",
            },
            "config_params": {
                "saving_arguments": {"output_name": "blob_lora", "save_every_n_epochs": 1},
                "training_arguments": {
                    "max_train_epochs": 2,
                    "resolution": "64,64",
                    "mixed_precision": "no",
                    "train_batch_size": 2,
                },
                # ESD's template buckets from 256 px up; kohya refuses a resolution below min_bucket_reso
                "dataset_arguments": {"min_bucket_reso": 64},
                "additional_network_arguments": {
                    "network_dim": 4,
                    "network_alpha": 4,
                    "unet_lr": 0.05,
                    "text_encoder_lr": 0.01,
                },
                "optimizer_arguments": {"optimizer_type": "AdamW", "learning_rate": 0.05, "lr_scheduler": "constant"},
            },
        },
    }
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]

    job = wait_until(
        lambda: TrainingJob.objects.filter(pk=job_id, status__in=["Completed", "Failed", "Stopped"]).first(),
        timeout=300,
    )
    assert job.status == "Completed", (job.reason, job.log)
    assert job.losses and job.progress.get("epoch") == 2
    # GPU-seconds accounting: the trainer's end event said how long it trained
    assert job.gpu_seconds > 0 and job.gpu_seconds_by_attempt == {"1": job.gpu_seconds}
    detail = api.get(f"trainings/{job_id}", key=admin_key).body["data"]
    assert detail["job_status"] == "Completed"
    checkpoint = Checkpoint.objects.get(pk=job_id)
    assert checkpoint.status == "Active" and checkpoint.checkpoint_type == "Lora"
    assert [f.name for f in checkpoint.files.all()] == ["blob_lora.safetensors", "blob_lora-000001.safetensors"]

    # The file is kohya/A1111-shaped: kohya key names, alpha tensors, ss_* metadata.
    store = blob_store()
    local = endpoints["tmp"] / "blob_lora.safetensors"
    local.write_bytes(store.read_bytes(f"kohya/train/{job_id}/output/blob_lora.safetensors"))
    with safe_open(str(local), "pt") as lora:
        names, metadata = list(lora.keys()), lora.metadata()
    assert any(n.startswith("lora_unet_") and n.endswith(".lora_down.weight") for n in names)
    assert any(n.startswith("lora_te_text_model_") for n in names) and any(n.endswith(".alpha") for n in names)
    assert metadata["ss_output_name"] == "blob_lora" and metadata["ss_network_dim"] == "4"

    params = {"prompt": "a photo of a blob", "seed": 3, "steps": 3, "width": 64, "height": 64}

    def image(prompt: str, models: dict) -> bytes:
        result = api.post(
            "inferences",
            {
                "task_type": "txt2img",
                "inference_type": "Real-time",
                "models": models,
                "payload_string": json.dumps({**params, "prompt": prompt}),
            },
            key=admin_key,
        )
        assert result.status == 200, result.body
        return requests.get(result.body["data"]["img_presigned_urls"][0], timeout=30).content

    base = {"Stable-diffusion": ["tiny.safetensors"]}
    plain = image("a photo of a blob", base)
    styled = image("a photo of a blob <lora:blob_lora:1>", {**base, "Lora": ["blob_lora.safetensors"]})
    assert plain != styled
