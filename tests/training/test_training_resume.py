"""Saved outputs, sample images and resume, end to end on the tiny model with the real trainer on the training
queue: files are uploaded as the run writes them, sample images show in the API and the console, and a stopped job
resumed from its state continues the step count and the loss curve of an uninterrupted run."""

import io
import time

import pytest
import requests
import torch
from safetensors.torch import load

from apps.models_registry.models import Checkpoint
from apps.training import training
from apps.training.models import TrainingJob
from esd.storage import blob_store
from tests.conftest import Api, wait_until
from tests.training.conftest import png

pytestmark = pytest.mark.django_db(transaction=True)
ENDED = ("Completed", "Failed", "Stopped")


def upload_dataset(api: Api, key: str, name: str, prefix: str, extra: dict[str, bytes] | None = None) -> None:
    """Three captioned images (and ``extra`` files) in ``prefix``, uploaded through the presigned URLs."""
    files = {f"{i}.png": png(i) for i in range(3)} | {f"{i}.txt": b"a photo of a blob" for i in range(3)}
    files |= extra or {}
    content = [
        {"filename": n, "name": n, "type": "image" if n.endswith(".png") else "text", "params": {}} for n in files
    ]
    created = api.post(
        "datasets",
        {"dataset_name": name, "prefix": prefix, "params": {}, "creator": "admin", "content": content},
        key=key,
    )
    assert created.status == 201, created.body
    for file_name, url in created.body["data"]["s3PresignUrl"].items():
        assert requests.put(url, data=files[file_name], timeout=30).status_code == 200
    assert api.put(f"datasets/{name}", {"status": "Enabled"}, key=key).status == 200


def start(api: Api, key: str, dataset: str, output_name: str, *, epochs: int, **extra: dict) -> str:
    body = {
        "lora_train_type": "kohya",
        "params": {
            "training_params": {
                "training_instance_type": "cpu",
                "model": "tiny.safetensors",
                "dataset": dataset,
                "fm_type": "sd_1_5",
            },
            "config_params": {
                "saving_arguments": {
                    "output_name": output_name,
                    "save_every_n_epochs": 1,
                    "save_state": True,
                    **extra.get("saving_arguments", {}),
                },
                "training_arguments": {
                    "max_train_epochs": epochs,
                    "resolution": "64,64",
                    "mixed_precision": "no",
                    "train_batch_size": 1,
                    "seed": 7,
                    **extra.get("training_arguments", {}),
                },
                "dataset_arguments": {"min_bucket_reso": 64},
                "additional_network_arguments": {"network_dim": 4, "network_alpha": 4},
                "optimizer_arguments": {"optimizer_type": "AdamW", "learning_rate": 0.01, "lr_scheduler": "constant"},
            },
        },
    }
    answer = api.post("trainings", body, key=key)
    assert answer.status == 201, answer.body
    return answer.body["data"]["id"]


def ended(job_id: str, timeout: float = 300) -> TrainingJob:
    return wait_until(lambda: TrainingJob.objects.filter(pk=job_id, status__in=ENDED).first(), timeout=timeout)


def pace_trainer(monkeypatch, seconds: float) -> None:
    """Every step of the trainer the worker runs is followed by a pause of ``seconds`` (after it is reported), so a
    stop sent when a save appears lands a known number of steps later however fast the machine is. The steps
    themselves are the real trainer's."""
    import gpu_runtime.trainer

    original = gpu_runtime.trainer.train

    def paced(*args, on_progress=None, **kwargs):
        def slowed(info: dict) -> None:
            if on_progress is not None:
                on_progress(info)
            time.sleep(seconds)

        return original(*args, on_progress=slowed, **kwargs)

    monkeypatch.setattr(gpu_runtime.trainer, "train", paced)


def lora_tensors(job_id: str, name: str) -> dict[str, torch.Tensor]:
    return load(blob_store().read_bytes(f"kohya/train/{job_id}/output/{name}"))


def test_samples_and_states_are_uploaded_as_the_run_goes(
    api: Api, admin_key, admin, client, worker, registered, trainer
):
    from PIL import Image

    prompts = (
        b"a photo of a blob --w 64 --h 64 --s 4 --d 5\n# a comment\nred blob --n blurry --w 64 --h 64 --s 4 --d 6\n"
    )
    upload_dataset(api, admin_key, "blobs", "2_blob", {"prompts.txt": prompts})
    job_id = start(
        api,
        admin_key,
        "blobs",
        "sampled",
        epochs=2,
        training_arguments={"sample_prompts": "prompts.txt", "sample_every_n_epochs": 1},
    )
    job = ended(job_id)
    assert job.status == "Completed", (job.reason, job.log)
    assert job.progress["worker"] == trainer.worker_id  # events name their worker (lost workers are failed)

    detail = api.get(f"trainings/{job_id}", key=admin_key).body["data"]
    samples = detail["samples"]
    # two prompts at the end of each of the two epochs, in the order they were made, with kohya's names
    assert [(s["epoch"], s["name"]) for s in samples] == [
        (1, "sample/sampled_e000001_00_5.png"),
        (1, "sample/sampled_e000001_01_6.png"),
        (2, "sample/sampled_e000002_00_5.png"),
        (2, "sample/sampled_e000002_01_6.png"),
    ]
    pictures = [requests.get(s["url"], timeout=30).content for s in samples]
    for data in pictures:
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    # same prompt and seed one epoch later: the LoRA trained in between changed the image
    assert pictures[0] != pictures[2] and pictures[1] != pictures[3]
    assert [(s["name"], s["step"]) for s in detail["states"]] == [
        ("sampled-000001-state.pt", 6),
        ("sampled-state.pt", 12),
    ]
    # the checkpoint holds the LoRA files only; the states stay beside them in the output folder
    checkpoint = Checkpoint.objects.get(pk=job_id)
    assert [f.name for f in checkpoint.files.all()] == ["sampled.safetensors", "sampled-000001.safetensors"]
    assert blob_store().exists(f"kohya/train/{job_id}/output/sampled-000001-state.pt")

    client.force_login(admin)
    page = client.get(f"/training/{job_id}/").content.decode()
    assert page.count('alt="sample ') == 4 and "sampled-000001-state.pt" in page
    assert 'id="training-resume"' not in page  # a completed job has nothing to resume


def test_a_stopped_job_resumed_from_its_state_continues_the_loss_curve(
    api: Api, admin_key, admin, client, worker, registered, trainer, monkeypatch
):
    upload_dataset(api, admin_key, "blobs", "10_blob")  # 30 steps an epoch
    reference_id = start(api, admin_key, "blobs", "straight", epochs=3)
    reference = ended(reference_id)
    assert reference.status == "Completed", (reference.reason, reference.log)

    pace_trainer(monkeypatch, 0.05)  # the run to stop: the stop below lands before its last step
    job_id = start(api, admin_key, "blobs", "resumed", epochs=3)
    first = wait_until(lambda: TrainingJob.objects.filter(pk=job_id, saved__icontains="state.pt").first(), 300)
    training.stop(first)
    stopped = ended(job_id)
    assert stopped.status == "Stopped", (stopped.reason, stopped.log)
    state = training.latest_state(stopped)
    assert state["kind"] == "state" and state["step"] % 30 == 0 and state["step"] < 90
    stopped_at = max(step for step, _ in stopped.losses)
    assert stopped_at < 90

    client.force_login(admin)
    page = client.get(f"/training/{job_id}/").content.decode()
    assert f"Resume from {state['name']}" in page
    answer = client.post(f"/training/{job_id}/resume/")
    assert answer.status_code == 302
    resumed = TrainingJob.objects.get(pk=job_id)
    assert resumed.attempt == 2 and resumed.status == "Starting" and not resumed.reason
    assert all(step <= state["step"] for step, _ in resumed.losses)  # the steps after the state are trained again

    job = ended(job_id)
    assert job.status == "Completed", (job.reason, job.log)
    assert any(f"resumed by admin from {state['name']}" in line for line in job.log)
    # both runs trained, and the job's GPU-seconds are their sum (the stopped run's too)
    runs = job.gpu_seconds_by_attempt
    assert set(runs) == {"1", "2"} and all(s > 0 for s in runs.values())
    assert job.gpu_seconds == pytest.approx(sum(runs.values()))
    # the curve goes on from the state's step and matches the uninterrupted run step for step
    curve, expected = dict(job.losses), dict(reference.losses)
    assert max(curve) == 90 and min(s for s in curve if s > state["step"]) == state["step"] + 1
    assert set(curve) == set(expected)
    for step, loss in expected.items():
        assert curve[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
    # and so does the LoRA it wrote
    mine, theirs = lora_tensors(job_id, "resumed.safetensors"), lora_tensors(reference_id, "straight.safetensors")
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6)
    assert Checkpoint.objects.get(pk=job_id).status == "Active"


def test_a_regularization_dataset_trains_with_the_job(api: Api, admin_key, worker, registered, trainer):
    from safetensors import safe_open

    upload_dataset(api, admin_key, "blobs", "2_blob")  # 6 training images with repeats
    upload_dataset(api, admin_key, "people", "1_person")  # 3 regularization images, repeated to 6
    job_id = start(api, admin_key, "blobs", "regular", epochs=1, training_arguments={"reg_data_dir": "people"})
    job = ended(job_id)
    assert job.status == "Completed", (job.reason, job.log)
    assert job.progress["steps"] == 12  # kohya: the reg images double the epoch
    path = registered["model"].parent / f"{job_id}.safetensors"
    path.write_bytes(blob_store().read_bytes(f"kohya/train/{job_id}/output/regular.safetensors"))
    with safe_open(str(path), "pt") as lora:
        metadata = lora.metadata()
    assert metadata["ss_num_reg_images"] == "3" and metadata["ss_num_train_images"] == "6"


def test_step_saves_rotate_like_kohya_and_a_mid_epoch_state_resumes_exactly(
    api: Api, admin_key, worker, registered, trainer, monkeypatch
):
    """kohya's step saves through the API and a real worker: ``save_every_n_steps = 10`` in a 60-step run writes
    ``-step00000010`` ... ``-step00000060`` files and states; ``save_last_n_steps = 20`` removes, at step s, the save
    of step s - 21 rounded down to a multiple of 10 (kohya keeps the saves of the last 20 steps), in storage too: 40,
    50 and 60 are left. A job stopped at its step-10 state - in the middle of the first 30-step epoch - and resumed
    continues the uninterrupted run's loss curve and ends with the same files."""
    from django.core.management import call_command

    upload_dataset(api, admin_key, "blobs", "10_blob")  # 30 steps an epoch
    steps = {"save_every_n_steps": 10, "save_last_n_steps": 20}

    def start_stepped(name: str) -> str:
        return start(api, admin_key, "blobs", name, epochs=2, saving_arguments=steps)

    def output_names(job_id: str, name: str) -> set[str]:
        prefix = f"kohya/train/{job_id}/output/"
        return {info.key[len(prefix) :].replace(name, "NAME") for info in blob_store().list(prefix)}

    reference_id = start_stepped("straight")
    reference = ended(reference_id)
    assert reference.status == "Completed", (reference.reason, reference.log)
    expected = {
        "NAME.safetensors",
        "NAME-state.pt",
        "NAME-000001.safetensors",
        "NAME-000001-state.pt",
        *(f"NAME-step000000{step}.safetensors" for step in (40, 50, 60)),
        *(f"NAME-step000000{step}-state.pt" for step in (40, 50, 60)),
    }
    assert output_names(reference_id, "straight") == expected  # steps 10 to 30 were rotated out
    assert {e["name"] for e in reference.saved if e["kind"] == "state"} == {
        n.replace("NAME", "straight") for n in expected if n.endswith("-state.pt")
    }
    files = [f.name for f in Checkpoint.objects.get(pk=reference_id).files.all()]
    assert files == [
        "straight.safetensors",
        "straight-000001.safetensors",
        "straight-step00000040.safetensors",
        "straight-step00000050.safetensors",
        "straight-step00000060.safetensors",
    ]

    pace_trainer(monkeypatch, 0.5)  # the stop lands before step 20 (the next state): 10 paced steps, 5 s
    job_id = start_stepped("resumed")
    first = wait_until(
        lambda: TrainingJob.objects.filter(pk=job_id, saved__icontains="step00000010-state.pt").first(), 300
    )
    training.stop(first)
    stopped = ended(job_id)
    monkeypatch.undo()
    assert stopped.status == "Stopped", (stopped.reason, stopped.log)
    state = training.latest_state(stopped)
    assert state["name"] == "resumed-step00000010-state.pt" and state["step"] == 10  # mid-epoch 1

    call_command("resume_training", job_id, "--by", "tester")
    job = ended(job_id)
    assert job.status == "Completed", (job.reason, job.log)
    curve, reference_curve = dict(job.losses), dict(reference.losses)
    assert set(curve) == set(reference_curve) == set(range(1, 61))
    for step, loss in reference_curve.items():
        assert curve[step] == pytest.approx(loss, rel=1e-5, abs=1e-7), step
    assert output_names(job_id, "resumed") == expected
    for suffix in ("-step00000040.safetensors", ".safetensors"):
        mine, theirs = lora_tensors(job_id, f"resumed{suffix}"), lora_tensors(reference_id, f"straight{suffix}")
        assert mine.keys() == theirs.keys()
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_a_run_with_more_step_saves_than_presigned_fails_before_its_first_step(
    api: Api, admin_key, worker, registered, trainer, settings
):
    settings.ESD_TRAINING_MAX_SAVES = 2  # URLs for step 10 and 20 of a 30-step run
    upload_dataset(api, admin_key, "blobs", "10_blob")
    job_id = start(api, admin_key, "blobs", "many", epochs=1, saving_arguments={"save_every_n_steps": 10})
    job = ended(job_id)
    assert job.status == "Failed"
    assert "save_every_n_steps = 10 makes 3 step saves: this job has no upload URL for many-step00000030" in job.reason
    assert not job.losses  # not a step was trained
    assert not list(blob_store().list(f"kohya/train/{job_id}/output/"))
