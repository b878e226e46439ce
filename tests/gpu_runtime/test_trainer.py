"""LoRA training on the tiny model, on CPU: kohya config semantics, kohya file format, the job protocol around it
(downloads, events, uploads, cancellation) and the training worker through a real broker queue."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import dramatiq
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from gpu_runtime import protocol
from gpu_runtime.families import config_dir_for
from gpu_runtime.trainer import (
    TrainingCancelled,
    TrainingConfig,
    TrainingError,
    load_dataset,
    output_file_names,
    train,
)
from gpu_runtime.training_worker import TrainingWorker, main_train, main_trainer, run_spec
from tests.gpu_runtime.conftest import Files

BASE_CONFIG = {
    "model_arguments": {"v2": False},
    "saving_arguments": {"output_name": "out", "save_every_n_epochs": 1, "save_model_as": "safetensors"},
    "training_arguments": {
        "max_train_epochs": 2,
        "train_batch_size": 2,
        "resolution": "64,64",
        "seed": 1337,
        "caption_extension": ".txt",
        "learning_rate": 1e-2,
        "network_dim": 4,
        "network_alpha": 2,
        "save_precision": "fp16",
        "cache_latents": True,
        "lr_scheduler": "cosine_with_restarts",
    },
}
PROMPT = "a photo of a cat"


def toml(data: dict) -> str:
    """A minimal TOML writer for the config tables the tests use (tables of scalars)."""
    lines = []
    for table, values in data.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}")
    return "\n".join(lines) + "\n"


def config_with(tmp_path: Path, name: str = "config.toml", **overrides) -> Path:
    data = json.loads(json.dumps(BASE_CONFIG))
    for key, value in overrides.items():
        table = next((t for t, v in data.items() if key in v), "training_arguments")
        if value is None:
            data[table].pop(key, None)
        else:
            data[table][key] = value
    path = tmp_path / name
    path.write_text(toml(data))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny model, a 4-image dataset (``2_tiny/``, captions in .txt) and a shared work dir (config dirs)."""
    from gpu_runtime.tiny import write_tiny_model

    base = tmp_path_factory.mktemp("training")
    write_tiny_model(base / "tiny.safetensors", seed=0)
    folder = base / "dataset" / "2_tiny"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(4):
        Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{PROMPT}, red, number {i}\n")
    (base / "work").mkdir()
    return base


def run(root: Path, tmp_path: Path, config: Path, **kwargs):
    return train(
        config,
        root / "tiny.safetensors",
        root / "dataset",
        tmp_path / "out",
        device="cpu",
        work_dir=root / "work",
        **kwargs,
    )


def generate(pipe, lora: Path | None = None) -> np.ndarray:
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name=f"a{uuid.uuid4().hex[:6]}")
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=2, width=64, height=64, generator=generator, output_type="np")
    return out.images[0]


def tiny_pipeline(root: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(root / "tiny.safetensors"),
        config=str(config_dir_for("tiny-sd15", root / "work" / "configs")),
        local_files_only=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- the trainer ------------------------------------------------------------------------------------------------


def test_two_epochs_write_kohya_files_that_load_and_change_images(root, tmp_path):
    progress = []
    result = run(root, tmp_path, config_with(tmp_path), on_progress=progress.append)

    assert [p.name for p in result.files] == ["out-000001.safetensors", "out.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["out-000001.safetensors", "out.safetensors"]
    # 4 images x 2 repeats / batch 2 = 4 steps per epoch
    assert (result.steps, result.epochs, result.family, result.seed) == (8, 2, "tiny-sd15", 1337)
    assert progress[-1]["step"] == progress[-1]["steps"] == 8
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert {p["epoch"] for p in progress} == {1, 2} and all(p["epochs"] == 2 for p in progress)
    assert all(np.isfinite(p["loss"]) for p in progress) and result.loss == progress[-1]["loss"]

    with safe_open(str(result.files[-1]), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in keys}
        alpha = handle.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha")
    assert dtypes == {torch.float16}  # save_precision
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_2_proj_out.lora_up.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert len(keys) == 252 and float(alpha) == 2.0
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert (meta["ss_output_name"], meta["ss_base_model_version"]) == ("out", "sd_v1")
    assert (meta["ss_num_epochs"], meta["ss_epoch"], meta["ss_max_train_steps"]) == ("2", "2", "8")
    assert (meta["ss_seed"], meta["ss_num_train_images"], meta["ss_resolution"]) == ("1337", "8", "(64, 64)")
    assert meta["ss_learning_rate"] == meta["ss_unet_lr"] == meta["ss_text_encoder_lr"] == "0.01"
    assert meta["ss_clip_skip"] == "None" and meta["ss_sd_model_name"] == "tiny.safetensors"
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert json.loads(meta["ss_tag_frequency"]) == {
        "2_tiny": {PROMPT: 4, "red": 4, "number 0": 1, "number 1": 1, "number 2": 1, "number 3": 1}
    }
    with safe_open(str(result.files[0]), "pt") as handle:
        assert handle.metadata()["ss_epoch"] == "1"

    pipe = tiny_pipeline(root)
    base = generate(pipe)
    with_lora = generate(pipe, result.files[-1])
    assert np.abs(base - with_lora).max() > 0.01
    pipe.unload_lora_weights()
    assert np.abs(generate(pipe, result.files[0]) - base).max() > 0.01  # the epoch file loads too


def test_unet_only_max_train_steps_warnings_and_determinism(root, tmp_path):
    config = config_with(
        tmp_path,
        max_train_epochs=None,
        max_train_steps=3,
        network_train_unet_only=True,
        xformers=True,
        mixed_precision="fp16",
        optimizer_type="AdamW8bit",
        enable_bucket=True,
        min_bucket_reso=64,
        flip_aug=True,
        color_aug=False,
        max_token_length=225,
    )
    first = run(root, tmp_path / "a", config)
    second = run(root, tmp_path / "b", config)
    assert first.steps == 3 and first.epochs == 1 and [p.name for p in first.files] == ["out.safetensors"]
    with safe_open(str(first.files[0]), "pt") as a, safe_open(str(second.files[0]), "pt") as b:
        keys = set(a.keys())
        assert keys and not [k for k in keys if k.startswith("lora_te")]
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)  # same seed, same LoRA
        assert a.metadata()["ss_network_train_unet_only"] == "True"
    assert first.loss == second.loss
    text = "\n".join(first.warnings)
    assert "xformers is ignored" in text
    # mixed_precision and AdamW8bit are applied on CPU too (float16 autocast, bitsandbytes' CPU backend)
    assert "mixed_precision" not in text and "AdamW8bit" not in text
    with safe_open(str(first.files[0]), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_mixed_precision"], meta["ss_optimizer"]) == ("fp16", "bitsandbytes.optim.adamw.AdamW8bit")
    # buckets and flip_aug are honoured (tests/gpu_runtime/test_trainer_buckets.py): deterministic, and no warning
    assert "enable_bucket" not in text and "min_bucket_reso" not in text
    assert "flip_aug" not in text and "color_aug" not in text
    assert "max_token_length" not in text  # honoured (test_trainer_captions.py)


def test_should_stop_raises_and_writes_no_final_file(root, tmp_path):
    steps = []

    def stop_after_five() -> bool:
        return len(steps) >= 5

    with pytest.raises(TrainingCancelled):
        run(root, tmp_path, config_with(tmp_path), on_progress=steps.append, should_stop=stop_after_five)
    assert len(steps) == 5
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["out-000001.safetensors"]


def test_save_last_n_epochs_and_the_other_honoured_options(root, tmp_path):
    config = config_with(
        tmp_path,
        max_train_epochs=4,
        train_batch_size=4,
        gradient_accumulation_steps=2,  # 8 samples / 4 per batch / 2 = 1 step per epoch
        save_last_n_epochs=2,
        network_train_text_encoder_only=True,
        gradient_checkpointing=True,
        min_snr_gamma=5,
        noise_offset=0.05,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=0.5,
        shuffle_caption=True,
        keep_tokens=1,
        clip_skip=2,
        cache_latents=False,
        optimizer_type="SGDNesterov",
        optimizer_args=["weight_decay=0.001"],
    )
    result = run(root, tmp_path, config)
    names = ["out-000002.safetensors", "out-000003.safetensors", "out.safetensors"]
    assert [p.name for p in result.files] == names and result.steps == 4 and np.isfinite(result.loss)
    assert not result.warnings
    with safe_open(str(result.files[-1]), "pt") as handle:
        keys, meta = handle.keys(), handle.metadata()
        # clip_skip 2 reads the output of layer 0 of 2: only layer 0 gets gradients (its LoRA up-weights start at 0)
        ups = [handle.get_tensor(k) for k in keys if "_layers_0_" in k and k.endswith(".lora_up.weight")]
    assert keys and all(k.startswith("lora_te_") for k in keys)
    assert len(ups) == 6 and all(up.abs().sum() > 0 for up in ups)  # trained through the checkpointed encoder
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(weight_decay=0.001,momentum=0.9,nesterov=True)"
    assert (meta["ss_clip_skip"], meta["ss_lr_warmup_steps"], meta["ss_min_snr_gamma"]) == ("2", "0.5", "5.0")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    epochs = TrainingConfig.from_toml(config)
    assert output_file_names(epochs, 4) == ["out-000001.safetensors", *names]


def test_bad_configs_and_datasets_are_clear_errors(root, tmp_path):
    for overrides, message in (
        ({"save_model_as": "ckpt"}, "save_model_as 'ckpt' is not supported"),
        ({"network_module": "lycoris.kohya"}, "network_module 'lycoris.kohya' is not supported"),
        ({"resolution": "500,64"}, "multiples of 8"),
        ({"learning_rate": "fast"}, "learning_rate must be a number"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be no, fp16 or bf16"),
        ({"output_name": "../x"}, "is not a valid file name"),
        ({"optimizer_type": "torch.optim.Nope"}, "optimizer_type torch.optim.Nope: torch.optim has no Nope"),
        ({"lr_scheduler": "cosine_annealing"}, "lr_scheduler 'cosine_annealing' is not supported"),
    ):
        with pytest.raises(TrainingError, match=message):
            run(root, tmp_path, config_with(tmp_path, **overrides))
    (tmp_path / "bad.toml").write_text("[training\n")
    with pytest.raises(TrainingError, match="not valid TOML"):
        run(root, tmp_path, tmp_path / "bad.toml")

    empty = tmp_path / "empty"
    (empty / "10_nothing").mkdir(parents=True)
    (empty / "10_nothing" / "notes.txt").write_text("no images here")
    with pytest.raises(TrainingError, match="the dataset has no images"):
        train(config_with(tmp_path), root / "tiny.safetensors", empty, tmp_path / "out", device="cpu")
    (tmp_path / "not-a-model.safetensors").write_bytes(b"nope")
    with pytest.raises(TrainingError, match="not a readable safetensors file"):
        train(config_with(tmp_path), tmp_path / "not-a-model.safetensors", root / "dataset", tmp_path / "o")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_config_semantics_and_dataset_layout(tmp_path):
    config = TrainingConfig.from_dict(
        {
            "saving_arguments": {"output_name": "lego", "save_every_n_epochs": "2"},
            "training": {"nested": {"max_train_steps": 7}, "unet_lr": "1e-4", "resolution": 512},
            "network_alpha": 8,
            "output_dir": "/somewhere",
        }
    )
    assert (config.output_name, config.save_every_n_epochs, config.max_train_steps) == ("lego", 2, 7)
    assert config.max_train_epochs is None and config.resolution == (512, 512)
    assert (config.unet_lr, config.text_encoder_lr, config.learning_rate) == (1e-4, 2e-6, 2e-6)  # kohya defaults
    assert (config.network_dim, config.network_alpha, config.caption_extension) == (4, 8.0, ".caption")
    assert any("ignored, the runtime decides these: output_dir" in w for w in config.warnings)
    # No silent drops: an option that would change the result and is not implemented, or that kohya does not
    # know, fails the run at start with its name (never a warning in a log)
    with pytest.raises(TrainingError) as refused:
        TrainingConfig.from_dict({"masked_loss": True, "vae": "vae.safetensors", "lr_restart_cycles": 1})
    assert str(refused.value) == (
        "options this trainer does not implement: masked_loss (masked loss is not supported); vae (a separate VAE "
        "is not supported: the checkpoint's VAE is used); lr_restart_cycles (not kohya train_network options)"
    )
    TrainingConfig.from_dict({"sample_prompts": "", "reg_data_dir": None, "save_state": False})  # unset: fine
    # kohya's own defaults ask for nothing: a public kohya config with them set runs
    TrainingConfig.from_dict({"token_warmup_min": 1, "sample_sampler": "ddim", "debug_dataset": False})
    with pytest.raises(TrainingError, match=r"debug_dataset \(kohya only shows the dataset and does not train\)"):
        TrainingConfig.from_dict({"debug_dataset": True})
    assert output_file_names(config, 5) == ["lego-000002.safetensors", "lego-000004.safetensors", "lego.safetensors"]
    unnamed = TrainingConfig.from_dict({"save_every_n_epochs": 1})
    assert output_file_names(unnamed, 2) == ["epoch-000001.safetensors", "last.safetensors"]  # kohya's defaults
    assert TrainingConfig.from_dict({"resolution": "768,512"}).resolution == (768, 512)

    # folders: <repeats>_<name>; no prefix -> 1 repeat; missing caption -> folder name; other files ignored
    (tmp_path / "3_lego").mkdir()
    (tmp_path / "misc").mkdir()
    Image.new("RGB", (100, 50), "red").save(tmp_path / "3_lego" / "a.jpg")
    (tmp_path / "3_lego" / "a.txt").write_text("\n  brick, red  \nsecond line\n")
    Image.new("RGBA", (40, 80)).save(tmp_path / "misc" / "b.webp")
    (tmp_path / "misc" / "readme.md").write_text("not an image")
    warnings: list[str] = []
    config = TrainingConfig.from_dict({"caption_extension": "txt", "resolution": 64})
    images = load_dataset(tmp_path, config, warnings)
    assert [(i.folder, i.repeats, i.caption) for i in images] == [("3_lego", 3, "brick, red"), ("misc", 1, "misc")]
    assert all(tuple(i.pixels.shape) == (3, 64, 64) for i in images)
    assert images[0].original_size == (50, 100) and images[0].crop_top_left == (0, 32)
    assert any("folder misc has no <repeats>_ prefix" in w for w in warnings)
    assert any("1 image(s) have no .txt caption" in w for w in warnings)


def test_sdxl_trains_with_kohya_sdxl_names(root, tmp_path):
    """A tiny SDXL-architecture checkpoint (second text encoder, size conditioning) through the same path."""
    import diffusers

    from gpu_runtime.tiny import write_tiny_sdxl_model

    model = write_tiny_sdxl_model(tmp_path / "xl.safetensors")

    config = config_with(tmp_path, max_train_epochs=1, clip_skip=2)
    result = train(config, model, root / "dataset", tmp_path / "out", device="cpu", work_dir=root / "work")
    assert [p.name for p in result.files] == ["out.safetensors"] and result.family == "tiny-sdxl"
    assert any("clip_skip is ignored for SDXL" in w for w in result.warnings)
    with safe_open(str(result.files[0]), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_1_proj_out.lora_up.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2.alpha" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_up.weight" in keys

    loaded = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(model), config=str(config_dir_for("tiny-sdxl", root / "work" / "configs")), local_files_only=True
    )
    loaded.set_progress_bar_config(disable=True)
    assert np.abs(generate(loaded) - generate(loaded, result.files[0])).max() > 0.01


# --- run_spec: URLs in, events out ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(root, tmp_path_factory):
    """The model, config and dataset behind GET URLs (like presigned S3 URLs); PUT bodies are kept."""
    folder = tmp_path_factory.mktemp("bucket")
    (folder / "model.safetensors").write_bytes((root / "tiny.safetensors").read_bytes())
    for path in (root / "dataset").rglob("*"):
        if path.is_file():
            target = folder / "dataset" / path.relative_to(root / "dataset")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (folder / "cancelled").write_text("yes")
    files = Files(folder)
    yield files
    files.server.shutdown()


def make_spec(files: Files, job_id: str, config: Path, *, model: str = "model.safetensors", cancel: str = "nope"):
    target = files.root / job_id / "config.toml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(config.read_text())
    dataset = {
        str(p.relative_to(files.root / "dataset")): files.url(str(p.relative_to(files.root)))
        for p in sorted((files.root / "dataset").rglob("*"))
        if p.is_file()
    }
    outputs = {name: files.url(f"put/{job_id}/{name}") for name in ("out.safetensors", "out-000001.safetensors")}
    return {
        "fm_type": "sd_1_5",
        "config_key": f"kohya/train/{job_id}/input/kohya_config_cloud.toml",
        "model_key": f"Stable-diffusion/checkpoint/custom/{job_id}/v1.safetensors",
        "dataset_prefix": "dataset/tiny",
        "output_prefix": f"kohya/train/{job_id}/output",
        "urls": {
            "config": files.url(f"{job_id}/config.toml"),
            "model": files.url(model),
            "dataset": dataset,
            "outputs": outputs,
            "cancel": files.url(cancel),
        },
    }


def run_job(root: Path, spec: dict, job_id: str, is_cancelled=lambda: False, send=None) -> list[dict]:
    events: list[dict] = []

    def collect(event: dict) -> None:
        protocol.validate_event(event)
        events.append(event)
        if send is not None:
            send(event)

    run_spec(
        job_id,
        spec,
        root / "work",
        device="cpu",
        send=collect,
        is_cancelled=is_cancelled,
        progress_seconds=0.0,
        cancel_poll_seconds=0.05,
    )
    return events


def test_run_spec_downloads_trains_uploads_and_reports(root, served, tmp_path):
    spec = make_spec(served, "job1", config_with(tmp_path))
    events = run_job(root, spec, "job1")
    statuses = [e["status"] for e in events]
    assert statuses[:3] == ["Downloading", "Training", "Training"] and statuses[-2:] == ["Uploading", "Completed"]
    assert all(e["kind"] == "training" and e["id"] == "job1" for e in events)
    progress = [e for e in events if e["status"] == "Training" and "step" in e]
    assert progress[-1]["step"] == progress[-1]["steps"] == 8 and progress[-1]["epochs"] == 2
    done = events[-1]
    assert done["files"] == ["out-000001.safetensors", "out.safetensors"] and done["reason"] == ""
    assert isinstance(done["warnings"], list) and done["steps"] == 8
    assert done["seconds"] > 0  # how long the run trained: the server's GPU-seconds for the training
    body = served.puts["put/job1/out.safetensors"]
    assert body[:8] and b"ss_network_module" in body[: 8 + int.from_bytes(body[:8], "little")]
    assert "put/job1/out-000001.safetensors" in served.puts
    assert not (root / "work" / "jobs" / "job1").exists()  # the job's folder is cleaned up
    assert (root / "work" / "models" / "job1" / "v1.safetensors").is_file()  # the model stays cached


def test_run_spec_failures_are_reported_not_raised(root, served, tmp_path):
    spec = make_spec(served, "job2", config_with(tmp_path), model="missing.safetensors")
    events = run_job(root, spec, "job2")
    assert [e["status"] for e in events] == ["Downloading", "Failed"]
    assert "model download failed" in events[-1]["reason"] and "404" in events[-1]["reason"]
    assert events[-1]["seconds"] == 0.0  # every end event says how long it trained: here not at all

    events = run_job(root, {"fm_type": "sd_1_5"}, "job3")
    assert [e["status"] for e in events] == ["Failed"] and "invalid training spec" in events[0]["reason"]
    assert events[0]["seconds"] == 0.0

    spec = make_spec(served, "job4", config_with(tmp_path, save_model_as="ckpt"))
    events = run_job(root, spec, "job4")
    assert events[-1]["status"] == "Failed" and "save_model_as 'ckpt' is not supported" in events[-1]["reason"]

    bad = make_spec(served, "job5", config_with(tmp_path))
    bad["urls"]["dataset"]["../escape.png"] = served.url("x")
    with pytest.raises(protocol.ProtocolError, match="not an allowed file path"):
        protocol.validate_training_spec(bad)


def test_run_spec_stops_when_cancelled(root, served, tmp_path):
    spec = make_spec(served, "job6", config_with(tmp_path), cancel="cancelled")  # the cancel URL answers 200
    events = run_job(root, spec, "job6")
    assert [e["status"] for e in events] == ["Stopped"] and events[0]["seconds"] == 0.0

    flagged = []

    def cancel_on_progress(event: dict) -> None:
        if event.get("step") == 2:
            flagged.append(True)

    events = run_job(
        root, make_spec(served, "job7", config_with(tmp_path)), "job7", lambda: bool(flagged), cancel_on_progress
    )
    assert events[-1]["status"] == "Stopped" and "cancelled" in events[-1]["reason"]
    assert max(e.get("step", 0) for e in events) == 2
    assert events[-1]["seconds"] > 0  # a stopped run still used the GPU until it stopped
    assert not any(k.startswith("put/job7/") for k in served.puts)


# --- the worker through a broker ----------------------------------------------------------------------------------


@pytest.fixture
def broker():
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    if url:
        from gpu_runtime.worker import make_broker

        yield make_broker(url)
    else:
        from dramatiq.brokers.stub import StubBroker

        yield StubBroker(middleware=[])


def test_training_worker_runs_and_skips_cancelled_jobs(root, served, broker, tmp_path):
    tag = uuid.uuid4().hex[:8]
    queue, events_queue = f"esd-training-t{tag}", f"events-{tag}"
    worker = TrainingWorker(
        broker, root / "work", queue=queue, events_queue=events_queue, device="cpu", poll_ms=50, progress_seconds=0.0
    )
    broker.declare_queue(events_queue)
    consumer = broker.consume(events_queue, prefetch=100, timeout=100)

    def enqueue(actor: str, *args) -> None:
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}))

    config = config_with(tmp_path, max_train_epochs=1)
    enqueue(protocol.CANCEL_TRAINING, "w-cancelled")
    enqueue(protocol.RUN_TRAINING, "w-cancelled", make_spec(served, "w-cancelled", config))
    enqueue(protocol.RUN_TRAINING, "w-run", make_spec(served, "w-run", config))
    seen: list[dict] = []
    worker.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
            e["id"] == "w-run" and e["status"] in ("Completed", "Failed") for e in seen
        ):
            message = next(consumer)
            if message is not None:
                assert message.actor_name == protocol.RUNTIME_EVENT
                event = protocol.validate_event(message.args[0])
                if event["kind"] == "training":  # the worker heartbeats too (test_worker_faults.py)
                    seen.append(event)
                consumer.ack(message)
    finally:
        worker.stop(timeout=60)
        consumer.close()
    by_job = {job: [e["status"] for e in seen if e["id"] == job] for job in ("w-cancelled", "w-run")}
    assert by_job["w-cancelled"] == ["Stopped"]
    assert by_job["w-run"][0] == "Downloading" and by_job["w-run"][-1] == "Completed"
    assert "Training" in by_job["w-run"] and "Uploading" in by_job["w-run"]
    assert "put/w-run/out.safetensors" in served.puts and not any("w-cancelled" in k for k in served.puts)


def drain_training_events(broker, events_queue: str) -> list[dict]:
    """Every training event waiting on the events queue (heartbeats left out), in order."""
    consumer = broker.consume(events_queue, prefetch=1000, timeout=200)
    events: list[dict] = []
    try:
        while (message := next(consumer)) is not None:
            event = protocol.validate_event(message.args[0])
            if event["kind"] == "training":
                events.append(event)
            consumer.ack(message)
    finally:
        consumer.close()
    return events


def wait_stopped(worker: TrainingWorker, seconds: float) -> bool:
    """Whether the worker stopped on its own (``once``) within ``seconds``; its threads are joined either way."""
    stopped = worker.stopping.wait(seconds)
    worker.stop(timeout=60)
    return stopped and not any(thread.is_alive() for thread in worker.threads)


def test_once_worker_runs_exactly_one_training_and_stops(root, served, broker, tmp_path):
    """``trainer --once`` (a Kubernetes Job per queued training): with two trainings queued, a worker runs one,
    acks it and stops; the other stays queued for the next Job, which runs it."""
    tag = uuid.uuid4().hex[:8]
    queue, events_queue = f"esd-training-o{tag}", f"events-{tag}"
    config = config_with(tmp_path, max_train_epochs=1)
    broker.declare_queue(queue)
    for job in ("once-a", "once-b"):
        spec = make_spec(served, job, config)
        broker.enqueue(
            dramatiq.Message(
                queue_name=queue, actor_name=protocol.RUN_TRAINING, args=(job, spec), kwargs={}, options={}
            )
        )

    def once_worker() -> TrainingWorker:
        return TrainingWorker(
            broker,
            root / "work",
            queue=queue,
            events_queue=events_queue,
            device="cpu",
            poll_ms=50,
            progress_seconds=0.0,
            heartbeat_seconds=0.2,
            once=True,
        )

    first = once_worker()
    first.start()
    assert wait_stopped(first, 120), "the --once worker did not stop after its training"
    assert first.trainings_handled == 1
    events = drain_training_events(broker, events_queue)
    jobs = {e["id"] for e in events}
    assert len(jobs) == 1, jobs  # exactly one of the two trainings ran
    (ran,) = jobs
    assert events[0]["status"] == "Downloading" and events[-1]["status"] == "Completed"
    assert f"put/{ran}/out.safetensors" in served.puts
    other = ({"once-a", "once-b"} - jobs).pop()
    assert not any(k.startswith(f"put/{other}/") for k in served.puts)

    second = once_worker()  # the next Job: the training the first one left is still queued, and acked once run
    second.start()
    assert wait_stopped(second, 120)
    events = drain_training_events(broker, events_queue)
    assert {e["id"] for e in events} == {other} and events[-1]["status"] == "Completed"
    assert ran not in {e["id"] for e in events}  # the first training was acked: it is not run again

    idle = TrainingWorker(
        broker, root / "work", queue=queue, events_queue=events_queue, poll_ms=50, once=True, idle_exit_seconds=0.5
    )
    started = time.monotonic()
    idle.start()
    assert wait_stopped(idle, 30) and time.monotonic() - started < 30  # nothing left: it gives its GPU back
    assert idle.trainings_handled == 0


def test_main_trainer_once_handles_a_cancelled_training_and_exits_0(tmp_path):
    """The command a ScaledJob's pod runs: a cancel seen before its training is honoured (``Stopped``, nothing
    trained), that training counts as the one, and the process exits 0; an empty queue ends it after the idle
    time."""
    url = os.environ.get("DRAMATIQ_BROKER_URL", "")
    if not url.startswith(("redis://", "amqp://")):
        pytest.skip("needs DRAMATIQ_BROKER_URL (redis:// or amqp://): the command builds its own broker")
    from gpu_runtime.worker import make_broker

    broker = make_broker(url)
    tag = uuid.uuid4().hex[:8]
    queue, events_queue = f"esd-training-c{tag}", f"events-{tag}"
    broker.declare_queue(queue)
    broker.declare_queue(events_queue)
    spec = {"fm_type": "sd_1_5", "urls": {}}  # never looked at: the run is cancelled before it starts
    for actor, args in ((protocol.CANCEL_TRAINING, ("cli-once",)), (protocol.RUN_TRAINING, ("cli-once", spec))):
        broker.enqueue(dramatiq.Message(queue_name=queue, actor_name=actor, args=args, kwargs={}, options={}))
    base = ["--broker", url, "--queue", queue, "--events-queue", events_queue, "--work-dir", str(tmp_path), "--once"]
    try:
        assert main_trainer(base) == 0
        events = drain_training_events(broker, events_queue)
        assert [(e["id"], e["status"]) for e in events] == [("cli-once", "Stopped")]
        started = time.monotonic()
        assert main_trainer([*base, "--idle-exit-seconds", "1"]) == 0
        assert time.monotonic() - started < 20
        with pytest.raises(SystemExit):
            main_trainer(["--broker", url, "--idle-exit-seconds", "5"])  # only meaningful with --once
    finally:
        broker.flush(queue)
        broker.flush(events_queue)
        broker.close()


# --- the command line ----------------------------------------------------------------------------------------------


def test_main_train_local_form_writes_files(root, tmp_path, capsys):
    config = config_with(tmp_path, max_train_epochs=1)
    spec = {"config": config.name, "model": str(root / "tiny.safetensors"), "dataset": str(root / "dataset")}
    spec["output"] = "result"  # relative paths are read from the spec file's folder
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = main_train(["--spec", str(tmp_path / "spec.json"), "--device", "cpu", "--work-dir", str(root / "work")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [p.name for p in (tmp_path / "result").iterdir()] == ["out.safetensors"]
    assert "epoch 1/1 step 4/4 loss" in out and "wrote" in out

    (tmp_path / "bad.json").write_text(json.dumps({**spec, "model": "missing.safetensors"}))
    assert main_train(["--spec", str(tmp_path / "bad.json"), "--device", "cpu", "--work-dir", str(root / "work")]) == 1


def test_main_train_queue_spec_form_prints_events(root, served, tmp_path, capsys):
    spec = make_spec(served, "cli", config_with(tmp_path, max_train_epochs=1))
    (tmp_path / "job.json").write_text(json.dumps({"job_id": "cli", "spec": spec}))
    code = main_train(["--spec", str(tmp_path / "job.json"), "--device", "cpu", "--work-dir", str(root / "work")])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 0 and events[-1]["status"] == "Completed" and events[-1]["id"] == "cli"
    assert "put/cli/out.safetensors" in served.puts
