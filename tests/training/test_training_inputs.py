"""The kohya keys that name files (``sample_prompts``, ``reg_data_dir``, ``network_weights``, ``base_weights``,
``resume``) bound to our datasets and checkpoints at creation; resume refusals; events of an earlier run."""

import tomllib
import uuid
from urllib.parse import urlsplit

import pytest
from django.core.management import CommandError, call_command

from apps.training import kohya_config, training
from apps.training.models import Dataset, TrainingJob
from apps.training.tasks import worker_training_event
from esd.storage import blob_store
from gpu_runtime import protocol
from tests.conftest import Api
from tests.models_registry.test_checkpoints import register
from tests.training.test_trainings_api import native, ready  # noqa: F401 (the fixture)

pytestmark = pytest.mark.django_db


@pytest.fixture
def extras(api: Api, admin_key, ready, disk_store):  # noqa: F811
    """A prompt file in the training dataset, a regularization dataset and a LoRA."""
    from apps.training import services

    dataset = Dataset.objects.get(name="lego")
    services.create_dataset(
        name="people",
        creator="admin",
        owners=["IT Operator"],
        params={},
        prefix="1_person",
        content=[{"filename": "p.png", "name": "p.png", "type": "image", "params": {}}],
    )
    disk_store.put_bytes("dataset/people/1_person/p.png", b"person")
    from apps.training.models import DatasetItem

    DatasetItem.objects.create(dataset=dataset, key="k", name="prompts.txt", filename="prompts.txt", type="text")
    disk_store.put_bytes("dataset/lego/10_technic/prompts.txt", b"a lego car --w 64 --h 64")
    register("style.safetensors", checkpoint_type="Lora", data=b"lora")
    return disk_store


def config_with(**training_arguments) -> dict:
    return {
        "saving_arguments": {"output_name": "lego_lora", "save_every_n_epochs": 1},
        "training_arguments": {"max_train_epochs": 2, **training_arguments},
    }


def spec_of(job_id: str) -> tuple[dict, dict]:
    """The stored config and the worker spec the job's row gives."""
    store = blob_store()
    job = TrainingJob.objects.get(pk=job_id)
    params = job.params["training_params"]
    config = tomllib.loads(store.read_bytes(store.key_of(params["s3_toml_path"])).decode())
    spec = training.training_spec(
        job, config, store.key_of(params["s3_model_path"]), Dataset.objects.get(name=params["dataset"])
    )
    return config, protocol.validate_training_spec(spec)


def test_named_files_become_the_workers_paths(api: Api, admin_key, extras, settings, client):
    body = native(
        config_params=config_with(
            sample_prompts="prompts.txt",
            sample_every_n_epochs=1,
            reg_data_dir="people",
            network_weights="style.safetensors",
        )
    )
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]
    # the API shows what the client gave; the worker's config holds the paths it downloads them to
    shown = answer.body["data"]["params"]["config_params"]["training_arguments"]
    assert (shown["reg_data_dir"], shown["sample_prompts"]) == ("people", "prompts.txt")
    config, spec = spec_of(job_id)
    arguments = config["training_arguments"]
    assert arguments["sample_prompts"] == "dataset/10_technic/prompts.txt"
    assert arguments["reg_data_dir"] == "inputs/reg"
    assert arguments["network_weights"] == "inputs/network_weights/style.safetensors"
    inputs = spec["urls"]["inputs"]
    assert set(inputs) == {"inputs/reg/1_person/p.png", "inputs/network_weights/style.safetensors"}
    assert fetch(client, inputs["inputs/reg/1_person/p.png"]) == b"person"
    assert fetch(client, inputs["inputs/network_weights/style.safetensors"]) == b"lora"
    assert "10_technic/prompts.txt" in spec["urls"]["dataset"]
    assert len(spec["urls"]["samples"]) == settings.ESD_TRAINING_SAMPLE_SLOTS and spec["attempt"] == 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sample_prompts": "nope.txt"}, "sample_prompts 'nope.txt' is not a file of dataset lego"),
        ({"reg_data_dir": "strangers"}, "reg_data_dir 'strangers' is not a dataset"),
        ({"network_weights": "missing.safetensors"}, "network_weights 'missing.safetensors' is not a Lora checkpoint"),
        ({"base_weights": ["style.safetensors", "../x"]}, "base_weights '../x' is not a Lora checkpoint file"),
        ({"resume": "old-state.pt"}, "resume cannot be set in config_params"),
        # what decides the files presigned for a run is read as the trainer reads it, or refused
        ({"save_every_n_steps": "often"}, "save_every_n_steps must be a whole number, got 'often'"),
        ({"save_every_n_steps": True}, "save_every_n_steps must be a whole number, got True"),
        ({"save_last_n_steps": 0}, "save_last_n_steps must be at least 1, got 0"),
        ({"save_n_epoch_ratio": 1.5}, "save_n_epoch_ratio must be a whole number, got 1.5"),
    ],
)
def test_unknown_names_are_refused_and_nothing_is_left(api: Api, admin_key, extras, arguments, message):
    answer = api.post("trainings", native(config_params=config_with(**arguments)), key=admin_key)
    assert answer.status == 400 and message in answer.body["message"], answer.body
    assert not TrainingJob.objects.exists()
    assert not list(blob_store().list("kohya/train/"))


def test_no_sample_slots_without_samples_and_states_are_expected_outputs(api: Api, admin_key, extras):
    body = native(
        config_params={
            **config_with(),
            "saving_arguments": {"output_name": "x", "save_every_n_epochs": 1, "save_state": True},
        }
    )
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]
    _, spec = spec_of(job_id)
    assert spec["urls"]["samples"] == [] and spec["urls"]["inputs"] == {}
    assert set(spec["urls"]["outputs"]) == {"x.safetensors", "x-000001.safetensors", "x-state.pt", "x-000001-state.pt"}


@pytest.mark.parametrize("name", ["None", " ", "x" * 234])
def test_an_output_name_the_trainer_cannot_write_is_refused(api: Api, admin_key, extras, name):
    """kohya reads "None" and blanks as unset (it would write ``last.safetensors``); a name whose longest file,
    ``{name}-step00000000-state.pt``, is over 255 bytes could not be saved mid-run."""
    body = native(config_params={**config_with(), "saving_arguments": {"output_name": name, "save_every_n_epochs": 1}})
    answer = api.post("trainings", body, key=admin_key)
    assert (answer.status, answer.body["message"]) == (400, f"filename {name} is not allowed"), answer.body
    assert not TrainingJob.objects.exists()


def test_numbers_written_as_text_presign_what_the_trainer_saves(api: Api, admin_key, extras):
    saving = {"output_name": "x", "save_every_n_epochs": 1, "save_every_n_steps": "5"}
    body = native(config_params={**config_with(), "saving_arguments": saving})
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    _, spec = spec_of(answer.body["data"]["id"])
    assert "x-step00000005.safetensors" in spec["urls"]["outputs"]


def test_save_n_epoch_ratio_needs_a_number_of_epochs():
    """The API's schema asks for max_train_epochs; an operator's template or another section may unset it."""
    with pytest.raises(ValueError, match="save_n_epoch_ratio needs max_train_epochs"):
        kohya_config.check_saving(
            {"a": {"max_train_epochs": 4}, "b": {"max_train_epochs": "", "save_n_epoch_ratio": 2}}
        )
    kohya_config.check_saving({"a": {"max_train_epochs": 4, "save_n_epoch_ratio": 2}})


def test_at_the_same_step_the_epoch_state_is_resumed_from(db):
    step_state = {**STATE, "name": "x-step00000012-state.pt", "step": 12}
    epoch_state = {**STATE, "name": "x-000002-state.pt", "epoch": 2, "step": 12}
    earlier = {**STATE, "name": "x-step00000010-state.pt", "step": 10}
    for saved in ([step_state, epoch_state, earlier], [earlier, epoch_state, step_state]):
        assert training.latest_state(job_with("Failed", saved))["name"] == "x-000002-state.pt"
    assert training.latest_state(job_with("Failed", [earlier, step_state]))["name"] == "x-step00000012-state.pt"


def test_step_saves_are_presigned_by_kohya_name_up_to_the_bound(api: Api, admin_key, extras, settings):
    settings.ESD_TRAINING_MAX_SAVES = 3
    body = native(
        config_params={
            **config_with(),
            "saving_arguments": {"output_name": "x", "save_every_n_epochs": 1, "save_every_n_steps": 50},
        }
    )
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    _, spec = spec_of(answer.body["data"]["id"])
    assert set(spec["urls"]["outputs"]) == {  # two epochs (config_with): one epoch file
        "x.safetensors",
        "x-000001.safetensors",
        "x-step00000050.safetensors",
        "x-step00000100.safetensors",
        "x-step00000150.safetensors",
    }


@pytest.mark.parametrize(
    ("saving", "expected"),
    [
        # epochs fixed: kohya's save_n_epoch_ratio sets the period, floor(10 / 3) = 3
        ({"max_train_epochs": 10, "save_n_epoch_ratio": 3}, ["x-000003", "x-000006", "x-000009"]),
        # the epoch saves are bounded too (the trainer refuses a run that makes more)
        ({"max_train_epochs": 10000}, ["x-000001", "x-000002", "x-000003"]),
        # a max_train_steps run: at most a step an epoch, step saves no later than the last step, both bounded
        ({"max_train_steps": 3, "save_every_n_epochs": 1}, ["x-000001", "x-000002"]),
        (
            {"max_train_steps": 120, "save_every_n_steps": 50},
            ["x-000001", "x-000002", "x-000003", "x-step00000050", "x-step00000100"],
        ),
        (
            {"max_train_steps": 1000, "save_every_n_steps": "100"},  # text, as the trainer reads it
            ["x-000001", "x-000002", "x-000003", "x-step00000100", "x-step00000200", "x-step00000300"],
        ),
        # a bad value (an operator's template: the API refuses it) is the trainer's to refuse by name
        ({"max_train_epochs": 2, "save_every_n_steps": "often"}, ["x-000001"]),
    ],
)
def test_expected_outputs_follow_kohya_periods(saving, expected):
    config = {"saving_arguments": {"output_name": "x", **saving}}
    names = kohya_config.expected_outputs(config, max_saves=3)
    assert names == ["x.safetensors", *(f"{base}.safetensors" for base in expected)]
    with_states = kohya_config.expected_outputs({"s": {**config["saving_arguments"], "save_state": True}}, 3)
    assert with_states == [*names, "x-state.pt", *(f"{base}-state.pt" for base in expected)]


def fetch(client, url: str) -> bytes:
    """A presigned GET of the local store, answered by its view."""
    parts = urlsplit(url)
    answer = client.get(f"{parts.path}?{parts.query}")
    assert answer.status_code == 200, url
    return b"".join(answer.streaming_content) if answer.streaming else answer.content


def job_with(status: str, saved: list[dict], backend: str = "self-hosted") -> TrainingJob:
    return TrainingJob.objects.create(id=uuid.uuid4(), owner="admin", backend=backend, status=status, saved=saved)


STATE = {"name": "x-000001-state.pt", "kind": "state", "epoch": 1, "step": 6, "attempt": 1, "key": "k"}


@pytest.mark.parametrize(
    ("status", "saved", "backend", "problem"),
    [
        ("Training", [STATE], "self-hosted", "only a failed or stopped training can be resumed; this one is Training"),
        ("Completed", [STATE], "self-hosted", "this one is Completed"),
        ("Failed", [], "self-hosted", "the training saved no state to resume from"),
        ("Stopped", [STATE], "sagemaker", "SageMaker trainings cannot be resumed here"),
    ],
)
def test_resume_refusals_name_the_reason(status, saved, backend, problem, client, admin):
    job = job_with(status, saved, backend)
    with pytest.raises(CommandError, match=problem):
        call_command("resume_training", str(job.id))
    client.force_login(admin)
    answer = client.post(f"/training/{job.id}/resume/", follow=True)
    assert problem in answer.content.decode()
    assert TrainingJob.objects.get(pk=job.pk).attempt == 1


def test_the_command_resumes_from_the_latest_state(api: Api, admin_key, extras, capsys, client):
    body = native(
        config_params={
            **config_with(),
            "saving_arguments": {"output_name": "x", "save_every_n_epochs": 1, "save_state": True},
        }
    )
    answer = api.post("trainings", body, key=admin_key)
    assert answer.status == 201, answer.body
    job_id = answer.body["data"]["id"]
    later = {**STATE, "name": "x-000002-state.pt", "epoch": 2, "step": 12}
    earlier = {**STATE, "key": f"kohya/train/{job_id}/output/x-000001-state.pt"}
    TrainingJob.objects.filter(pk=job_id).update(
        status="Failed", reason="out of memory", saved=[later, earlier], losses=[[6, 0.5], [12, 0.4], [13, 0.3]]
    )
    later["key"] = f"kohya/train/{job_id}/output/x-000002-state.pt"
    TrainingJob.objects.filter(pk=job_id).update(saved=[later, earlier])
    blob_store().put_bytes(later["key"], b"state")

    call_command("resume_training", "--list")
    assert f"{job_id} Failed resumes from x-000002-state.pt" in capsys.readouterr().out
    call_command("resume_training", job_id, "--by", "ops")
    assert f"{job_id} Starting run 2, from x-000002-state.pt (step 12)" in capsys.readouterr().out
    job = TrainingJob.objects.get(pk=job_id)
    assert (job.status, job.reason, job.attempt, job.losses) == ("Starting", "", 2, [[6, 0.5], [12, 0.4]])
    config, spec = spec_of(job_id)
    assert config["training_arguments"]["resume"] == "inputs/resume/x-000002-state.pt"
    assert spec["attempt"] == 2
    assert fetch(client, spec["urls"]["inputs"]["inputs/resume/x-000002-state.pt"]) == b"state"

    # a late event of the first run changes nothing; the second run's events count
    worker_training_event({"kind": "training", "id": job_id, "status": "Failed", "reason": "late", "attempt": 1})
    assert TrainingJob.objects.get(pk=job_id).status == "Starting"
    worker_training_event({"kind": "training", "id": job_id, "status": "Training", "step": 13, "attempt": 2})
    assert TrainingJob.objects.get(pk=job_id).progress["step"] == 13


def test_saved_entries_are_merged_and_removals_delete_the_file(extras):
    job = job_with("Training", [])
    key = f"kohya/train/{job.id}/output/x-000001.safetensors"
    blob_store().put_bytes(key, b"epoch 1")
    entry = {"name": "x-000001.safetensors", "kind": "model", "epoch": 1, "step": 6}
    event = {"kind": "training", "id": str(job.id), "status": "Training"}
    worker_training_event({**event, "saved": [entry]})
    worker_training_event({**event, "saved": [entry, {"name": "../x", "kind": "model"}]})  # again, and a bad one
    assert [e["key"] for e in TrainingJob.objects.get(pk=job.pk).saved] == [key]
    worker_training_event({**event, "saved": [{**entry, "removed": True}]})
    assert TrainingJob.objects.get(pk=job.pk).saved == [] and not blob_store().exists(key)


def test_a_run_never_goes_back_a_stage_and_reports_of_another_run_change_nothing(extras):
    job = job_with("Uploading", [])
    TrainingJob.objects.filter(pk=job.pk).update(attempt=2)
    training.update_status(str(job.id), "Training", progress={"step": 9}, attempt=2)  # handled late
    job.refresh_from_db()
    assert (job.status, job.progress["step"]) == ("Uploading", 9)
    training.update_status(str(job.id), "Training", progress={"step": 3, "loss": 0.9}, attempt=1)
    training.finish(str(job.id), "Failed", "late failure of run 1", attempt=1)
    job.refresh_from_db()
    assert (job.status, job.reason, job.progress["step"], job.losses) == ("Uploading", "", 9, [])


def test_a_removal_deletes_the_file_the_entry_names(extras):
    """A resumed run (attempt 2) removes an epoch file saved by run 1: the stored key of run 1's entry is deleted."""
    job = job_with("Training", [])
    key = f"kohya/train/{job.id}/output/x-000001.safetensors"
    sample_key = f"kohya/train/{job.id}/output/sample/1-0000.png"
    for stored in (key, sample_key):
        blob_store().put_bytes(stored, b"run 1")
    saved = [
        {"name": "x-000001.safetensors", "kind": "model", "epoch": 1, "step": 6, "attempt": 1, "key": key},
        {"name": "sample/x_e000001_00.png", "kind": "sample", "epoch": 1, "step": 6, "attempt": 1, "key": sample_key},
    ]
    TrainingJob.objects.filter(pk=job.pk).update(attempt=2, saved=saved)
    event = {"kind": "training", "id": str(job.id), "status": "Training", "attempt": 2}
    removed = {"name": "x-000001.safetensors", "kind": "model", "epoch": 2, "step": 12, "removed": True}
    worker_training_event({**event, "saved": [removed]})
    assert not blob_store().exists(key) and blob_store().exists(sample_key)
    assert [e["name"] for e in TrainingJob.objects.get(pk=job.pk).saved] == ["sample/x_e000001_00.png"]


def test_saving_flags_must_be_booleans(api: Api, admin_key, extras):
    config = {**config_with(), "saving_arguments": {"output_name": "x", "save_every_n_epochs": 1, "save_state": "yes"}}
    answer = api.post("trainings", native(config_params=config), key=admin_key)
    assert answer.status == 400 and answer.body["message"] == "save_state must be true or false, got 'yes'"
    assert not TrainingJob.objects.exists()


def test_a_training_whose_worker_stopped_heartbeating_is_failed(extras, settings):
    from datetime import timedelta

    from django.utils import timezone

    from apps.endpoints.models import Worker

    now = timezone.now()
    lost, alive, unknown, queued = (
        job_with(status, [STATE]) for status in ("Training", "Training", "Uploading", "Starting")
    )
    for job, worker in ((lost, "host-a/1"), (alive, "host-b/1"), (unknown, "host-c/1"), (queued, "host-a/1")):
        training.update_status(str(job.id), job.status, progress={"step": 3, "worker": worker})
    Worker.objects.create(
        endpoint_name=settings.ESD_TRAINING_QUEUE, worker="host-a/1", last_seen=now - timedelta(seconds=400)
    )
    Worker.objects.create(endpoint_name=settings.ESD_TRAINING_QUEUE, worker="host-b/1", last_seen=now)
    settings.ESD_TRAINING_WORKER_LOST_SECONDS = 300
    assert training.fail_lost() == 1
    statuses = {job.pk: job for job in TrainingJob.objects.all()}
    failed = statuses[lost.pk]
    assert failed.status == "Failed" and failed.reason.startswith(
        "the training worker host-a/1 stopped (last heard of "
    )
    assert failed.reason.endswith(": resume it from its latest state") and training.resume_problem(failed) is None
    assert blob_store().exists(f"kohya/train/{lost.id}/cancel")  # a redelivery of its message will not run
    assert [statuses[j.pk].status for j in (alive, unknown, queued)] == ["Training", "Uploading", "Starting"]
