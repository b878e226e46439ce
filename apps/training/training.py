"""Training job operations (contract §9.8, §10.5, §12): create, submit, follow, complete, delete.

A job and its output ``Lora`` checkpoint are created together with the same id. Whatever the backend, progress
arrives through ``update_status`` and the end through ``finish``, which lists the output folder: the files that
are actually there decide between ``Completed`` (checkpoint Active with those names) and ``Failed``.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.accounts import webhooks
from apps.accounts.models import User, held_role_names
from apps.endpoints.usage import check_quota
from apps.models_registry.choices import CheckpointStatus, CheckpointType
from apps.models_registry.models import Checkpoint, CheckpointFile, CheckpointOwner
from apps.models_registry.services import set_status as set_checkpoint_status
from apps.training import kohya_config
from apps.training.choices import FM_TYPES, RUN_STAGES, TERMINAL_TRAINING, TrainingStatus
from apps.training.models import Dataset, TrainingJob
from esd import keys
from esd.api.errors import BadRequest
from esd.owners import save_owners
from esd.progress import with_eta  # the one estimate of time left (inference jobs use it too)
from esd.storage import blob_store

log = logging.getLogger(__name__)
MAX_LOSSES = 2000


# --- create ----------------------------------------------------------------------------------------------------------


def translate_document_form(user: User, permissions: frozenset[str], training_params: dict) -> tuple[str, str]:
    """The 1.5.0 document's ``s3_model_path`` / ``s3_data_path`` -> the model file and dataset names."""
    store = blob_store()
    model_path = training_params.get("s3_model_path", "")
    prefix, _, file_name = model_path.rpartition("/")
    key = store.key_of(prefix)
    checkpoint = (
        Checkpoint.objects.visible_to(user, permissions).filter(prefix=key, files__name=file_name).first()
        if key and file_name
        else None
    )
    if checkpoint is None:
        raise BadRequest("Model not found")
    data_key = store.key_of(training_params.get("s3_data_path", "").rstrip("/")) or ""
    parts = data_key.split("/")
    if len(parts) != 2 or parts[0] != "dataset" or not parts[1]:
        raise BadRequest("Dataset not found")
    return file_name, parts[1]


def create_training(*, user: User, permissions: frozenset[str], lora_train_type: str, params: dict) -> TrainingJob:
    """Contract §9.8 POST, steps 1-8."""
    if lora_train_type != "kohya":
        raise BadRequest(f"Invalid lora train type: {lora_train_type}, the valid value is kohya.")
    check_quota(user)  # the role quota (apps.endpoints.usage), before anything is written
    training_params = dict(params["training_params"])
    given_config = params.get("config_params") or {}
    job_id = uuid.uuid4()
    document = "s3_model_path" in training_params or "s3_data_path" in training_params
    if document:
        training_params["model"], training_params["dataset"] = translate_document_form(
            user, permissions, training_params
        )
    model = (
        Checkpoint.objects.visible_to(user, permissions)
        .filter(
            status=CheckpointStatus.ACTIVE,
            checkpoint_type=CheckpointType.STABLE_DIFFUSION,
            files__position=0,
            files__name=training_params["model"],
        )
        .first()
    )
    if model is None:
        raise BadRequest("Model not found")
    dataset = Dataset.objects.visible_to(user, permissions).filter(name=training_params["dataset"]).first()
    if dataset is None:
        raise BadRequest("Dataset not found")
    fm_type = training_params["fm_type"]
    if fm_type not in FM_TYPES:
        raise BadRequest(f"Invalid fm_type {fm_type}, the valid values are sd_1_5 and sd_xl")
    template = kohya_config.load_template(fm_type)
    if document:
        merged = kohya_config.merge_document(template, given_config.get("training") or {}, f"lora_{str(job_id)[:8]}")
        shown_config = kohya_config.config_params_of(
            merged,
            {
                "saving_arguments": {
                    k: v for k, v in merged["saving_arguments"].items() if k in ("output_name", "save_every_n_epochs")
                },
                "training_arguments": {"max_train_epochs": merged["training_arguments"].get("max_train_epochs")},
            },
        )
    else:
        merged = kohya_config.merge_native(template, given_config)
        shown_config = kohya_config.config_params_of(merged, given_config)
    # the name the trainer reads (kohya reads all sections as one), with the longest file name it makes from it
    output_name = kohya_config.flatten(merged)["output_name"]
    if (
        not isinstance(output_name, str)
        or kohya_config.unset(output_name)
        or not keys.is_segment(f"{output_name}-step00000000-state.pt")
    ):
        raise BadRequest(f"filename {output_name} is not allowed")
    if CheckpointFile.objects.filter(name=f"{output_name}.safetensors").exists():
        raise BadRequest(f"{output_name}.safetensors already exists, please use another or rename/delete exists")
    inputs = bind_inputs(merged, user, permissions, dataset)

    store = blob_store()
    template_name = FM_TYPES[fm_type]
    input_prefix, output_prefix = keys.training_input(str(job_id)), keys.training_output(str(job_id))
    model_key = f"{model.prefix}/{training_params['model']}"
    toml_key = f"{input_prefix}/{template_name}"
    training_params.update(
        s3_model_path=store.uri(model_key),
        s3_data_path=store.uri(dataset.folder),
        s3_toml_path=store.uri(toml_key),
    )
    store.put_bytes(toml_key, kohya_config.dumps(merged).encode())
    job = TrainingJob(
        id=job_id,
        owner=user.username,
        backend=settings.ESD_TRAINING_BACKEND,
        params={"training_type": "kohya", "training_params": training_params, "config_params": shown_config},
        inputs=inputs,
    )
    try:
        with transaction.atomic():
            check_quota(user)  # again, with the user locked: two requests cannot both take the last free slot
            checkpoint = Checkpoint.objects.create(
                id=job_id,
                checkpoint_type=CheckpointType.LORA,
                status=CheckpointStatus.INITIAL,
                prefix=output_prefix,
                creator=user.username,
                params={"training_job_id": str(job_id)},
            )
            CheckpointFile.objects.create(checkpoint=checkpoint, position=0, name=output_name)
            save_owners(CheckpointOwner, checkpoint, held_role_names(user))
            job.save()
    except BadRequest:
        store.delete_folder(input_prefix)
        raise
    except IntegrityError:
        store.delete_folder(input_prefix)
        raise BadRequest(
            f"{output_name}.safetensors already exists, please use another or rename/delete exists"
        ) from None
    try:
        submit(job, merged, model_key, dataset)
    except BaseException:
        store.delete_folder(input_prefix)
        Checkpoint.objects.filter(pk=job_id).delete()
        job.delete()
        raise
    update_status(str(job.id), TrainingStatus.STARTING)
    job.status = TrainingStatus.STARTING
    return job


# --- inputs the config names ----------------------------------------------------------------------------------------

# kohya keys that name files on the training machine; here they name things of ours, bound at creation.
INPUT_FOLDER = "inputs"


def bind_inputs(config: dict[str, dict], user: User, permissions: frozenset[str], dataset: Dataset) -> dict[str, Any]:
    """Turn the kohya keys that name files into things of ours, and the config's paths into the worker's.

    Why: kohya reads these keys as paths on the training machine, which a client of ours cannot know. Here
    ``sample_prompts`` names a file of the training dataset, ``reg_data_dir`` a dataset (kohya's ``N_class``
    folders: its prefix), ``network_weights`` / ``base_weights`` Lora checkpoint files the user can see; ``resume``
    is set by resuming a job, never by hand. The config is rewritten in place to the paths the worker downloads them
    to (relative to its config file); the returned ``inputs`` say what to download (``training_spec``).
    """
    flat = kohya_config.flatten(config)
    files: dict[str, str] = {}
    inputs: dict[str, Any] = {"files": files}
    for key in ("save_state", "save_state_on_train_end"):  # the uploads presigned for a run depend on them
        if key in flat and not isinstance(flat[key], bool):
            raise BadRequest(f"{key} must be true or false, got {flat[key]!r}")
    try:
        kohya_config.check_saving(config)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if flat.get("resume"):
        raise BadRequest("resume cannot be set in config_params: resume a stopped or failed job instead")
    prompts = flat.get("sample_prompts")
    if prompts:
        item = dataset.items.filter(filename=prompts).first() if isinstance(prompts, str) else None
        if item is None:
            raise BadRequest(f"sample_prompts {prompts!r} is not a file of dataset {dataset.name}")
        relative = dataset.file_key(item.filename)[len(keys.dataset_prefix(dataset.name)) + 1 :]
        kohya_config.set_key(config, "sample_prompts", f"dataset/{relative}")
    reg = flat.get("reg_data_dir")
    if reg:
        reg_dataset = (
            Dataset.objects.visible_to(user, permissions).filter(name=reg).first() if isinstance(reg, str) else None
        )
        if reg_dataset is None:
            raise BadRequest(f"reg_data_dir {reg!r} is not a dataset (the regularization images' dataset)")
        inputs["reg_dataset"] = reg_dataset.name
        kohya_config.set_key(config, "reg_data_dir", f"{INPUT_FOLDER}/reg")
    for key in ("network_weights", "base_weights"):
        value = flat.get(key)
        if not value:
            continue
        names = value if isinstance(value, list) else [value]
        paths = []
        for name in names:
            checkpoint = (
                Checkpoint.objects.visible_to(user, permissions)
                .filter(status=CheckpointStatus.ACTIVE, checkpoint_type=CheckpointType.LORA, files__name=name)
                .first()
                if isinstance(name, str) and keys.is_segment(name)
                else None
            )
            if checkpoint is None:
                raise BadRequest(f"{key} {name!r} is not a Lora checkpoint file")
            path = f"{INPUT_FOLDER}/{key}/{name}"
            files[path] = f"{checkpoint.prefix}/{name}"
            paths.append(path)
        kohya_config.set_key(config, key, paths if isinstance(value, list) else paths[0])
    return inputs


# --- backends --------------------------------------------------------------------------------------------------------


def submit(job: TrainingJob, config: dict, model_key: str, dataset: Dataset) -> None:
    if job.backend == "sagemaker":
        _submit_sagemaker(job)
    else:
        spec = training_spec(job, config, model_key, dataset)
        transaction.on_commit(lambda: send_training(str(job.id), spec))


def training_spec(job: TrainingJob, config: dict, model_key: str, dataset: Dataset) -> dict:
    """The self-hosted ``run_training`` spec (contract §12.2) with presigned URLs for everything a GPU host needs:
    the merged config, the base model, each dataset file, a PUT per possible output file, and the cancel flag."""
    from gpu_runtime import protocol

    store = blob_store()
    job_id = str(job.id)
    expires = settings.ESD_DATASET_UPLOAD_EXPIRES  # queued trainings may wait: the longest S3 allows (7 days)
    base = keys.dataset_prefix(dataset.name)
    files = [info.key for info in store.list(base + "/")]
    toml_key = f"{keys.training_input(job_id)}/{FM_TYPES[job.params['training_params']['fm_type']]}"
    output_prefix = keys.training_output(job_id)
    inputs = {path: store.presign_get(key, expires) for path, key in (job.inputs.get("files") or {}).items()}
    if job.inputs.get("reg_dataset"):
        reg_base = keys.dataset_prefix(job.inputs["reg_dataset"])
        for info in store.list(reg_base + "/"):
            inputs[f"{INPUT_FOLDER}/reg/{info.key[len(reg_base) + 1 :]}"] = store.presign_get(info.key, expires)
    slots = settings.ESD_TRAINING_SAMPLE_SLOTS if kohya_config.samples_requested(config) else 0
    spec = {
        "fm_type": job.params["training_params"]["fm_type"],
        "config_key": toml_key,
        "model_key": model_key,
        "dataset_prefix": base,
        "output_prefix": output_prefix,
        "attempt": job.attempt,
        "urls": {
            "config": store.presign_get(toml_key, expires),
            "model": store.presign_get(model_key, expires),
            "dataset": {key[len(base) + 1 :]: store.presign_get(key, expires) for key in files},
            "outputs": {
                name: store.presign_put(f"{output_prefix}/{name}", expires)
                for name in kohya_config.expected_outputs(config, settings.ESD_TRAINING_MAX_SAVES)
            },
            "inputs": inputs,
            "samples": [
                store.presign_put(keys.training_sample(job_id, job.attempt, slot), expires) for slot in range(slots)
            ],
            "cancel": store.presign_get(keys.training_cancel_marker(job_id), expires),
        },
    }
    validate = getattr(protocol, "validate_training_spec", None)
    return validate(spec) if validate else spec


def send_training(job_id: str, spec: dict) -> None:
    import dramatiq

    from gpu_runtime import protocol

    broker = dramatiq.get_broker()
    broker.declare_queue(settings.ESD_TRAINING_QUEUE)
    broker.enqueue(
        dramatiq.Message(
            queue_name=settings.ESD_TRAINING_QUEUE,
            actor_name=protocol.RUN_TRAINING,
            args=(job_id, spec),
            kwargs={},
            options={},
        )
    )


def _b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def _submit_sagemaker(job: TrainingJob) -> None:
    """``CreateTrainingJob`` named ``kohya-{timestamp}`` with the contract's base64 JSON hyperparameters."""
    from botocore.exceptions import ClientError

    from esd.aws import client

    store = blob_store()
    job_id = str(job.id)
    name = f"kohya-{timezone.now():%Y%m%d%H%M%S%f}"[:63]
    training_params = job.params["training_params"]
    try:
        client("sagemaker").create_training_job(
            TrainingJobName=name,
            RoleArn=settings.ESD_SAGEMAKER_ROLE_ARN,
            AlgorithmSpecification={
                "TrainingImage": settings.ESD_SAGEMAKER_TRAINING_IMAGE,
                "TrainingInputMode": "File",
            },
            HyperParameters={
                "sagemaker_program": _b64("extensions/sd-webui-sagemaker/sagemaker_entrypoint_json.py"),
                "params": _b64({"training_params": training_params, "training_id": job_id}),
                "s3-input-path": _b64(store.uri(keys.training_input(job_id))),
                "s3-output-path": _b64(store.uri(keys.training_output(job_id))),
                "training-type": _b64("kohya"),
            },
            OutputDataConfig={"S3OutputPath": store.uri(keys.training_output(job_id))},
            ResourceConfig={
                "InstanceType": training_params["training_instance_type"],
                "InstanceCount": 1,
                "VolumeSizeInGB": 125,
            },
            StoppingCondition={"MaxRuntimeInSeconds": 86400},
            Environment={"BUCKET_NAME": settings.ESD_BUCKET, "TRAINING_JOB_ID": job_id},
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("ValidationException", "ResourceLimitExceeded", "ResourceInUse"):
            raise BadRequest(str(exc)) from exc
        raise
    TrainingJob.objects.filter(pk=job.pk).update(sagemaker_name=name)
    job.sagemaker_name = name
    from esd.tasks import enqueue

    enqueue("apps.training.tasks.monitor_sagemaker_training", job_id)


def stop(job: TrainingJob) -> None:
    """Stop a running job; errors are ignored (contract §9.8 DELETE)."""
    store = blob_store()
    try:
        if job.backend == "sagemaker" and job.sagemaker_name:
            from esd.aws import client

            client("sagemaker").stop_training_job(TrainingJobName=job.sagemaker_name)
        else:
            store.put_bytes(keys.training_cancel_marker(str(job.id)), b"cancelled")
            import dramatiq

            from gpu_runtime import protocol

            broker = dramatiq.get_broker()
            broker.declare_queue(settings.ESD_TRAINING_QUEUE)
            broker.enqueue(
                dramatiq.Message(
                    queue_name=settings.ESD_TRAINING_QUEUE,
                    actor_name=protocol.CANCEL_TRAINING,
                    args=(str(job.id), job.attempt),
                    kwargs={},
                    options={},
                )
            )
    except Exception:
        log.warning("could not stop training %s", job.id, exc_info=True)


# --- progress and the end --------------------------------------------------------------------------------------------


def record_saved(job: TrainingJob, entries: list[dict]) -> list[str]:
    """Merge a run's ``saved`` entries into ``job.saved`` (idempotent: by kind and name); returns the storage keys
    of files the run removed again (``save_last_n_epochs``), for the caller to delete after the commit."""
    output_prefix = keys.training_output(str(job.id))
    saved = {(entry["kind"], entry["name"]): entry for entry in job.saved}
    removed = []
    for entry in entries:
        kind, name = entry["kind"], entry["name"]
        if kind == "sample":
            key = keys.training_sample(str(job.id), job.attempt, entry["slot"])
        else:
            key = f"{output_prefix}/{name}"
        if entry.get("removed"):
            popped = saved.pop((kind, name), None)
            if popped is not None:  # its own key: a resumed run removes files of the run before
                removed.append(popped.get("key") or key)
            continue
        saved[(kind, name)] = {
            "name": name,
            "kind": kind,
            "epoch": entry.get("epoch"),
            "step": entry.get("step"),
            "attempt": job.attempt,
            "key": key,
        }
    job.saved = list(saved.values())
    return removed


def update_status(
    job_id: str,
    status: str,
    reason: str = "",
    progress: dict | None = None,
    notes: list[str] | None = None,
    saved: list[dict] | None = None,
    gpu_seconds: float | None = None,
    attempt: int | None = None,
) -> TrainingJob | None:
    """The one place a training's status changes; terminal jobs stay as they are, a run never goes back a stage
    (``RUN_STAGES``), and a report of another run than the job's current one (``attempt``: a late event of the run
    a resume replaced) changes nothing - checked under the row lock, which a resume takes too. ``gpu_seconds``
    (with a terminal status) is what the ending run trained: recorded for the job's current attempt, the job's
    total their sum."""
    removed: list[str] = []
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status in TERMINAL_TRAINING:
            return job
        if attempt is not None and job.attempt != attempt:
            log.info("ignoring a report of run %s of training %s, which is at run %s", attempt, job_id, job.attempt)
            return job
        if saved:
            removed = record_saved(job, saved)
        if status in RUN_STAGES and job.status in RUN_STAGES:
            status = max(status, job.status, key=RUN_STAGES.index)
        job.status = status
        if reason:
            job.reason = reason
        if progress:
            job.progress = with_eta({**job.progress, **progress}, timezone.now().timestamp())
            if isinstance(progress.get("loss"), int | float) and isinstance(progress.get("step"), int):
                job.losses = [*job.losses, [progress["step"], progress["loss"]]][-MAX_LOSSES:]
        if notes:
            job.log = job.log + [n for n in notes if n not in job.log]
        if status in TERMINAL_TRAINING:
            job.finished = timezone.now()
            webhooks.job_ended("training", str(job.id), job.owner)
            if gpu_seconds is not None:
                job.gpu_seconds_by_attempt = {**job.gpu_seconds_by_attempt, str(job.attempt): float(gpu_seconds)}
                job.gpu_seconds = round(sum(job.gpu_seconds_by_attempt.values()), 3)
        job.save()
    if removed:
        store = blob_store()
        for key in removed:
            store.delete(key)
    return job


def finish(
    job_id: str,
    status: str,
    reason: str = "",
    notes: list[str] | None = None,
    saved: list[dict] | None = None,
    gpu_seconds: float | None = None,
    attempt: int | None = None,
) -> TrainingJob | None:
    """The end of a run: ``Completed`` needs output files; the checkpoint follows the job (contract §10.5).
    ``saved`` is everything the run uploaded (the final event carries it all); ``gpu_seconds`` how long it trained
    (a redelivered end finds the job terminal and changes nothing, so a run is counted once). The job's row is
    locked throughout, so an end and a resume never interleave."""
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status in TERMINAL_TRAINING or (attempt is not None and job.attempt != attempt):
            return job
        return _finish_locked(job, status, reason, notes, saved, gpu_seconds)


def _finish_locked(
    job: TrainingJob,
    status: str,
    reason: str,
    notes: list[str] | None,
    saved: list[dict] | None,
    gpu_seconds: float | None,
) -> TrainingJob | None:
    job_id = str(job.id)
    if saved:
        update_status(job_id, job.status, saved=saved)
    if status == TrainingStatus.COMPLETED:
        store = blob_store()
        prefix = keys.training_output(job_id) + "/"
        files = sorted(
            info.key[len(prefix) :]
            for info in store.list(prefix)
            if info.key.endswith(".safetensors") and "/" not in info.key[len(prefix) :]
        )
        if not files:
            status, reason = TrainingStatus.FAILED, reason or "training ended without output files"
        else:
            final = f"{job.output_name}.safetensors"
            files.sort(key=lambda name: (name != final, name))
            with transaction.atomic():
                checkpoint = Checkpoint.objects.filter(pk=job_id).first()
                if checkpoint is not None:
                    CheckpointFile.objects.filter(checkpoint=checkpoint).delete()
                    CheckpointFile.objects.bulk_create(
                        CheckpointFile(checkpoint=checkpoint, position=i, name=name) for i, name in enumerate(files)
                    )
                    set_checkpoint_status(checkpoint, CheckpointStatus.ACTIVE)
                TrainingJob.objects.filter(pk=job_id).update(output_files=files)
    if status != TrainingStatus.COMPLETED:
        checkpoint = Checkpoint.objects.filter(pk=job_id).first()
        if checkpoint is not None:
            set_checkpoint_status(checkpoint, CheckpointStatus.DISABLED, error=reason or status)
    return update_status(job_id, status, reason, notes=notes, gpu_seconds=gpu_seconds)


def fail_lost() -> int:
    """Fail the running self-hosted trainings whose worker stopped heartbeating for
    ``ESD_TRAINING_WORKER_LOST_SECONDS``: a killed pod or host sends no end, and its message may never come back
    (a KEDA Job starts only for queued messages), so without this the job would show ``Training`` for ever. The
    reason says when the worker was last heard of; a job with a state can be resumed."""
    from datetime import timedelta

    from apps.endpoints.models import Worker

    running = TrainingJob.objects.filter(backend="self-hosted", status__in=RUN_STAGES[1:])
    lost_before = timezone.now() - timedelta(seconds=settings.ESD_TRAINING_WORKER_LOST_SECONDS)
    workers = {
        w.worker: w.last_seen
        for w in Worker.objects.filter(endpoint_name=settings.ESD_TRAINING_QUEUE, last_seen__lt=lost_before)
    }
    count = 0
    for job in running.only("id", "progress", "attempt", "saved", "backend", "status"):
        last_seen = workers.get(job.progress.get("worker"))
        if last_seen is None:  # alive, or never heard of: not ours to judge
            continue
        hint = ": resume it from its latest state" if latest_state(job) else ""
        reason = f"the training worker {job.progress['worker']} stopped (last heard of {last_seen:%Y-%m-%d %H:%M:%S})"
        if finish(str(job.id), TrainingStatus.FAILED, reason + hint, attempt=job.attempt):
            count += 1
            # its un-acked message may come back to a worker: the cancel marker makes it answer Stopped at once
            blob_store().put_bytes(keys.training_cancel_marker(str(job.id)), b"worker lost")
    return count


# --- resume ----------------------------------------------------------------------------------------------------------


def latest_state(job: TrainingJob) -> dict | None:
    """The state a resume continues from: the one saved at the highest step."""
    states = [entry for entry in job.saved if entry.get("kind") == "state"]
    # at the same step an epoch's (or the final) state wins over a step state: it is past the epoch's end work
    return max(
        states, key=lambda entry: (entry.get("step") or 0, "-step" not in entry["name"], entry["name"]), default=None
    )


def resume_problem(job: TrainingJob) -> str | None:
    """Why the job cannot be resumed (None when it can): the console shows it, the command and API refuse with it."""
    if job.status not in (TrainingStatus.FAILED, TrainingStatus.STOPPED):
        return f"only a failed or stopped training can be resumed; this one is {job.status}"
    if job.backend == "sagemaker":
        return "SageMaker trainings cannot be resumed here: resume runs on self-hosted training workers"
    if latest_state(job) is None:
        return "the training saved no state to resume from (it needs save_state = true and one finished save)"
    return None


def resume_training(job_id: Any, by: str) -> TrainingJob:
    """Run a failed or stopped job again from its latest saved state, as the same job: the step count and the loss
    curve go on, the output checkpoint is the same row. The next attempt number makes workers treat it as a new
    run and the server ignore late events of the old one."""
    import tomllib

    store = blob_store()
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().filter(pk=job_id).first()
        if job is None:
            raise BadRequest("training not found")
        problem = resume_problem(job)
        if problem:
            raise BadRequest(problem)
        state = latest_state(job)
        params = job.params["training_params"]
        dataset = Dataset.objects.filter(name=params["dataset"]).first()
        if dataset is None:
            raise BadRequest(f"the training's dataset {params['dataset']} was deleted")
        if job.inputs.get("reg_dataset") and not Dataset.objects.filter(name=job.inputs["reg_dataset"]).exists():
            raise BadRequest(f"the training's regularization dataset {job.inputs['reg_dataset']} was deleted")
        toml_key = store.key_of(params["s3_toml_path"])
        config = tomllib.loads(store.read_bytes(toml_key).decode())
        path = f"{INPUT_FOLDER}/resume/{state['name']}"
        kohya_config.set_key(config, "resume", path)
        files = {
            p: k for p, k in (job.inputs.get("files") or {}).items() if not p.startswith(f"{INPUT_FOLDER}/resume/")
        }
        job.inputs = {**job.inputs, "files": {**files, path: state["key"]}}
        job.attempt += 1
        job.status = TrainingStatus.STARTING
        job.reason = ""
        job.finished = None
        step = state.get("step") or 0
        job.losses = [point for point in job.losses if point[0] <= step]
        job.progress = {k: v for k, v in job.progress.items() if k in ("epochs", "steps")} | {"step": step}
        job.log = [*job.log, f"resumed by {by} from {state['name']} (step {step})"]
        job.save()
        checkpoint = Checkpoint.objects.filter(pk=job.pk).first()
        if checkpoint is not None:
            set_checkpoint_status(checkpoint, CheckpointStatus.INITIAL)
        spec = training_spec(job, config, store.key_of(params["s3_model_path"]), dataset)
        # storage last, once nothing here can fail any more: a refused resume leaves the job's files as they were
        store.put_bytes(toml_key, kohya_config.dumps(config).encode())
        store.delete(keys.training_cancel_marker(str(job.id)))
        transaction.on_commit(lambda: send_training(str(job.id), spec))
    return job


def delete_trainings(jobs: list[TrainingJob]) -> int:
    """Stop, delete the input folder; unless completed also the output folder and checkpoint; delete the row."""
    store = blob_store()
    for job in jobs:
        job_id = str(job.id)
        if job.status not in TERMINAL_TRAINING:
            stop(job)
        store.delete_folder(keys.training_input(job_id))
        if job.status != TrainingStatus.COMPLETED:
            store.delete_folder(keys.training_output(job_id))
            Checkpoint.objects.filter(pk=job_id).delete()
        job.delete()
    return len(jobs)
