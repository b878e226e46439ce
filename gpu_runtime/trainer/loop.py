"""The training run: :func:`train` (config, device, seed, dataset) and the loop proper, which encodes captions,
steps the optimizer, reports progress, honours cancellation and saves the epoch and final files."""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_runtime.trainer.buckets import BucketBatches
from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.dataset import TrainImage, _caption, _pixels, load_dataset
from gpu_runtime.trainer.errors import TrainingCancelled, TrainingError
from gpu_runtime.trainer.metadata import _finish, _metadata
from gpu_runtime.trainer.network import (
    TEXT_TARGETS,
    UNET_TARGETS,
    _add_lora,
    _checkpoint_text_encoder,
    _kohya_state_dict,
    _load_model,
    _Model,
    _save,
    _save_dtype,
    _target_modules,
)
from gpu_runtime.trainer.optim import _lr_schedule, _optimizer

Progress = Callable[[dict], None]


@dataclass
class TrainResult:
    """What a finished training produced: the files (epoch files first, the final file last) and its log."""

    files: list[Path]
    warnings: list[str]
    loss: float
    seconds: float
    steps: int
    epochs: int
    family: str
    seed: int


def _resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error rather than a crash later."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device} was asked for but CUDA is not available")
    return device


def _weight_dtype(config: TrainingConfig, device: str, warnings: list[str]) -> torch.dtype:
    """Frozen weights in the mixed precision on CUDA; always float32 on CPU (half precision is slow or missing)."""
    if config.mixed_precision == "no":
        return torch.float32
    if not device.startswith("cuda"):
        warnings.append(f"mixed_precision {config.mixed_precision} is ignored on CPU: training runs in float32")
        return torch.float32
    if config.mixed_precision == "bf16":
        if not torch.cuda.is_bf16_supported():
            raise TrainingError("mixed_precision bf16 is not supported by this GPU")
        return torch.bfloat16
    return torch.float16


class _Encoder:
    """Captions -> UNet conditioning (prompt embeddings; for SDXL also pooled embeddings), as kohya computes it."""

    def __init__(self, model: _Model, config: TrainingConfig, device: str, warnings: list[str]):
        self.model = model
        self.device = device
        self.clip_skip = config.clip_skip or 1
        if model.xl and config.clip_skip and config.clip_skip > 1:
            warnings.append("clip_skip is ignored for SDXL (its penultimate layers are always used)")

    def _ids(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoders, tokenizers = self.model.text_encoders, self.model.tokenizers
        if not self.model.xl:
            encoder = encoders[0]
            output = encoder(self._ids(tokenizers[0], captions), output_hidden_states=True)
            if self.clip_skip <= 1:
                return output.last_hidden_state, None
            norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            return norm(output.hidden_states[-self.clip_skip]), None
        first = encoders[0](self._ids(tokenizers[0], captions), output_hidden_states=True)
        second = encoders[1](self._ids(tokenizers[1], captions), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds


def train(
    config_path: Path,
    model_path: Path,
    dataset_dir: Path,
    output_dir: Path,
    *,
    device: str = "auto",
    on_progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    work_dir: Path | None = None,
) -> TrainResult:
    """Train a kohya-format LoRA for ``model_path`` on ``dataset_dir`` as ``config_path`` says; write the epoch
    files and the final file into ``output_dir``.

    ``on_progress({"epoch", "epochs", "step", "steps", "loss"})`` is called after every optimizer step (``loss`` is
    the running mean of the current epoch, like kohya's ``avr_loss``); ``should_stop()`` is checked before every
    step and stops the run with :class:`TrainingCancelled` (no final file). Deterministic for a given ``seed`` on
    CPU; the caller's global RNG state is left as it was. ``work_dir`` holds the offline config dirs.
    """
    started_at = time.time()
    config = TrainingConfig.from_toml(Path(config_path))
    warnings = list(config.warnings)
    device = _resolve_device(device)
    seed = config.seed if config.seed is not None else random.randrange(2**31)
    if config.seed is None:
        warnings.append(f"no seed given: using {seed}")
    images = load_dataset(Path(dataset_dir), config, warnings)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()) / "esd-trainer"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        return _train(
            config, Path(model_path), images, output_dir, work_dir, device, seed, warnings, started_at,
            on_progress, should_stop,
        )  # fmt: skip


def _train(
    config: TrainingConfig,
    model_path: Path,
    images: list[TrainImage],
    output_dir: Path,
    work_dir: Path,
    device: str,
    seed: int,
    warnings: list[str],
    started_at: float,
    on_progress: Progress | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    """The training loop proper (see :func:`train`); runs inside a forked, seeded RNG."""
    weight_dtype = _weight_dtype(config, device, warnings)
    model = _load_model(model_path, work_dir / "configs", device, weight_dtype)
    width, height = config.resolution
    factor = 8 * 2 ** (len(model.unet.config["block_out_channels"]) - 1)
    if width % factor or height % factor:
        raise TrainingError(f"resolution {width}x{height} must be a multiple of {factor} for this model")
    if config.enable_bucket:
        steps_needed = 32 if model.xl else 64  # kohya's verify_bucket_reso_steps (sdxl_train_network: 32)
        if config.bucket_reso_steps and config.bucket_reso_steps % steps_needed:
            raise TrainingError(
                f"bucket_reso_steps is {config.bucket_reso_steps}: it must be divisible by {steps_needed} for this "
                "model (as in kohya)"
            )
        for w, h in sorted({image.bucket for image in images}):
            if w % factor or h % factor:
                raise TrainingError(f"bucket {w}x{h} must be a multiple of {factor} for this model")
    if config.v2 and model.family != "sd2":
        warnings.append(f"v2 is set but the checkpoint is a {model.family} model: trained as {model.family}")
    if config.prior_loss_weight != 1.0:
        warnings.append("prior_loss_weight has no effect: regularization images are not supported")

    scheduler = model.noise_scheduler
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if config.v_parameterization is not None:
        prediction = "v_prediction" if config.v_parameterization else "epsilon"
    max_timestep = min(config.max_timestep, scheduler.config.num_train_timesteps)

    # adapters
    params_unet: list[torch.nn.Parameter] = []
    params_text: list[torch.nn.Parameter] = []
    if config.train_unet:
        params_unet = _add_lora(model.unet, _target_modules(model.unet, UNET_TARGETS, unet=True), config)
    if config.train_text_encoder:
        for encoder in model.text_encoders:
            params_text += _add_lora(encoder, _target_modules(encoder, TEXT_TARGETS, unet=False), config)
    if not params_unet and not params_text:
        raise TrainingError("the model has no layers kohya's LoRA can train")
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in model.text_encoders:
                _checkpoint_text_encoder(encoder)
    model.unet.train(config.train_unet)
    for encoder in model.text_encoders:
        encoder.train(config.train_text_encoder)

    # schedule: steps = epochs x ceil(batches / gradient accumulation); batches = ceil(images x repeats / batch),
    # with buckets the sum of that over the buckets (a batch never mixes buckets)
    samples = sum(image.repeats for image in images)
    buckets = None
    if config.enable_bucket:
        buckets = BucketBatches([(image.bucket, image.repeats) for image in images], config.train_batch_size, seed)
        batches_per_epoch = len(buckets)
    else:
        batches_per_epoch = math.ceil(samples / config.train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    if config.max_train_epochs:
        epochs = config.max_train_epochs
        total_steps = epochs * steps_per_epoch
    else:
        total_steps = config.max_train_steps
        epochs = math.ceil(total_steps / steps_per_epoch)

    groups = []
    if params_unet:
        groups.append({"params": params_unet, "lr": config.unet_lr})
    if params_text:
        groups.append({"params": params_text, "lr": config.text_encoder_lr})
    optimizer, optimizer_name = _optimizer(config, groups, device, warnings)
    lr_schedule = _lr_schedule(config, optimizer, total_steps, warnings)
    scaler = torch.amp.GradScaler("cuda") if weight_dtype == torch.float16 else None
    autocast = device.startswith("cuda") and weight_dtype != torch.float32
    trainable = params_unet + params_text

    generator = torch.Generator(device="cpu").manual_seed(seed)
    rng = random.Random(seed)
    encode = _Encoder(model, config, device, warnings)
    vae = model.vae
    scaling = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0

    def latents_of(batch: list[torch.Tensor]) -> torch.Tensor:
        pixels = torch.stack(batch).to(device=device, dtype=torch.float32)
        pixels = pixels / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generator).to(device)
            latents = dist.mean + dist.std * noise
        return (latents - shift) * scaling

    # kohya caches the mirrored latents too when flip_aug is on (cache_batch_latents); color_aug and random_crop
    # cannot be cached (the config refuses them with cache_latents)
    cache: dict[tuple[int, bool], torch.Tensor] = {}
    if config.cache_latents:
        for index, image in enumerate(images):
            cache[index, False] = latents_of([image.pixels])[0]
            if config.flip_aug:
                cache[index, True] = latents_of([image.pixels.flip(-1)])[0]

    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    metadata = _metadata(
        config, model, images, seed, epochs, total_steps, batches_per_epoch, optimizer_name, started_at
    )
    metadata["ss_sd_model_name"] = model_path.name
    written: list[Path] = []
    epoch_files: list[Path] = []
    step = 0
    loss_value = float("nan")
    for epoch in range(1, epochs + 1):
        if buckets is not None:
            batches = buckets.batches(epoch)
        else:
            order = [index for index, image in enumerate(images) for _ in range(image.repeats)]
            rng.shuffle(order)
            size = config.train_batch_size
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        epoch_losses: list[float] = []
        for number, batch_indexes in enumerate(batches, start=1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
            batch = [images[i] for i in batch_indexes]
            # per sample in kohya's __getitem__ order: the flip draw, the crop and color draws, the caption
            flips, pixels, captions = [], [], []
            for image in batch:
                flips.append(config.flip_aug and rng.random() < 0.5)
                if not config.cache_latents:
                    pixels.append(_pixels(image, config, rng, flips[-1]))
                captions.append(_caption(image, config, rng))
            if config.cache_latents:
                latents = torch.stack([cache[i, flipped] for i, flipped in zip(batch_indexes, flips, strict=True)])
            else:
                latents = latents_of(pixels)
            noise = torch.randn(latents.shape, generator=generator)
            if config.noise_offset:
                noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
            noise = noise.to(device)
            timesteps = torch.randint(config.min_timestep, max_timestep, (len(batch),), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(device_type="cuda", dtype=weight_dtype, enabled=autocast):
                with torch.set_grad_enabled(config.train_text_encoder):
                    hidden, pooled = encode(captions)
                extra = {}
                if model.xl:
                    # kohya's original size (h, w), crop top/left (of the mirrored image when flipped), target (h, w)
                    time_ids = torch.tensor(
                        [
                            [
                                *image.original_size,
                                *(image.flipped_crop_top_left if flipped else image.crop_top_left),
                                image.bucket[1],
                                image.bucket[0],
                            ]
                            for image, flipped in zip(batch, flips, strict=True)
                        ],
                        device=device,
                        dtype=hidden.dtype,
                    )
                    extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
                prediction_out = model.unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype), **extra).sample
            target = scheduler.get_velocity(latents, noise, timesteps) if prediction == "v_prediction" else noise
            loss = torch.nn.functional.mse_loss(prediction_out.float(), target.float(), reduction="none")
            loss = loss.mean(dim=[1, 2, 3])
            if config.min_snr_gamma:
                snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
                weight = torch.clamp(snr, max=config.min_snr_gamma) / snr
                if prediction == "v_prediction":
                    weight = torch.clamp(snr, max=config.min_snr_gamma) / (snr + 1)
                loss = loss * weight
            loss = loss.mean()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}: lower the learning rate or use bf16/no "
                    "mixed precision"
                )
            epoch_losses.append(loss.item())
            scaled = loss / config.gradient_accumulation_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
            if number % config.gradient_accumulation_steps and number != len(batches):
                continue
            if scaler:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = sum(epoch_losses) / len(epoch_losses)
            if on_progress is not None:
                on_progress({"epoch": epoch, "epochs": epochs, "step": step, "steps": total_steps, "loss": loss_value})
            if step >= total_steps:
                break
        last = epoch == epochs or step >= total_steps
        if last:
            break
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            path = output_dir / config.epoch_file(epoch)
            _save(path, _kohya_state_dict(model, config, _save_dtype(config)), _finish(metadata, epoch, step))
            written.append(path)
            epoch_files.append(path)
            if config.save_last_n_epochs is not None:
                while len(epoch_files) > config.save_last_n_epochs:
                    old = epoch_files.pop(0)
                    old.unlink(missing_ok=True)
                    written.remove(old)
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
    final = output_dir / config.final_file()
    _save(final, _kohya_state_dict(model, config, _save_dtype(config)), _finish(metadata, epochs, step))
    written.append(final)
    return TrainResult(
        files=written,
        warnings=warnings,
        loss=loss_value,
        seconds=time.time() - started_at,
        steps=step,
        epochs=epochs,
        family=model.family,
        seed=seed,
    )
