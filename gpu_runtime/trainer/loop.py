"""The training run: :func:`train` (config, device, seed, dataset) and the loop proper, which encodes captions,
steps the optimizer, reports progress, honours cancellation and saves the epoch and final files."""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from gpu_runtime.trainer.buckets import BucketBatches
from gpu_runtime.trainer.captions import _Encoder, process_caption
from gpu_runtime.trainer.config import (
    RESUME_IGNORED,
    TrainingConfig,
    check_prediction,
    output_file_names,
    timestep_range,
)
from gpu_runtime.trainer.dataset import RegImages, TrainImage, _pixels, load_dataset, load_reg_images
from gpu_runtime.trainer.errors import TrainingCancelled, TrainingError
from gpu_runtime.trainer.lora import create_network
from gpu_runtime.trainer.losses import step_loss
from gpu_runtime.trainer.metadata import _finish, _metadata
from gpu_runtime.trainer.network import _checkpoint_text_encoder, _load_model, _save, _save_dtype
from gpu_runtime.trainer.noise import enforce_zero_terminal_snr, noisy_latents, snr_table
from gpu_runtime.trainer.optim import _eval_weights, _lr_schedule, _optimizer, _precision
from gpu_runtime.trainer.samples import SampleMaker, load_prompts
from gpu_runtime.trainer.state import (
    check_state,
    comparable_config,
    dataset_digest,
    load_state,
    restore_rngs,
    rng_states,
    save_state,
)

Progress = Callable[[dict], None]
# ``on_output({"kind": "model" | "state" | "sample", "path", "epoch", "step", "removed"})``: a file was written
# (or, with ``removed``, deleted again by the ``save_last_n_*`` options) - so a worker can upload it while the run
# goes on. ``epoch`` is the epoch in progress (or just ended), ``step`` the optimizer steps done.
Output = Callable[[dict], None]


@dataclass
class TrainResult:
    """What a finished training produced: the files still there (the epoch and step files and states in the order
    they were written, then the final file and, with ``save_state`` / ``save_state_on_train_end``, the final
    state), the sample images (in the order they were made, under ``sample/``) and its log."""

    files: list[Path]
    warnings: list[str]
    loss: float
    seconds: float
    steps: int
    epochs: int
    family: str
    seed: int
    samples: list[Path] = field(default_factory=list)


def _resolve_device(device: str) -> str:
    """``auto`` picks CUDA when present; asking for CUDA without it is a clear error rather than a crash later."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {device} was asked for but CUDA is not available")
    return device


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
    on_output: Output | None = None,
    uploadable: Collection[str] | None = None,
) -> TrainResult:
    """Train a kohya-format LoRA for ``model_path`` on ``dataset_dir`` as ``config_path`` says; write the epoch
    files and the final file into ``output_dir``.

    ``on_progress({"epoch", "epochs", "step", "steps", "loss"})`` is called after every optimizer step (``loss`` is
    the running mean of the current epoch, like kohya's ``avr_loss``); ``should_stop()`` is checked before every
    step and stops the run with :class:`TrainingCancelled` (no final file). ``on_output`` hears of every file as
    it is written or removed, so what a run saved before it failed or was stopped can be kept. Deterministic for a
    given ``seed`` on CPU; the caller's global RNG state is left as it was. ``work_dir`` holds the offline config dirs.

    With ``resume`` (a state file a ``save_state`` run wrote) the run continues from that state's step exactly as
    the saved run would have; a config or dataset that would train differently is refused, naming what differs.
    ``uploadable`` (the names of the files the job has an upload URL for) makes the run check, once its steps are
    known and before the model is loaded, that every model file and state it may write is among them, and fail
    with a :class:`TrainingError` naming the first missing file and the option that makes it otherwise (a file
    without a URL would be trained for and then lost). None checks nothing.
    With ``reg_data_dir`` (resolved against the config file's folder) kohya's regularization images join the
    dataset, repeated to the training images' count, and their loss is weighted by ``prior_loss_weight``.
    """
    started_at = time.time()
    config = TrainingConfig.from_toml(Path(config_path))
    warnings = list(config.warnings)
    device = _resolve_device(device)
    state = load_state(config.resume) if config.resume is not None else None
    if state is not None:
        seed = int(state["seed"])
    else:
        seed = config.seed if config.seed is not None else random.randrange(2**31)
        if config.seed is None:
            warnings.append(f"no seed given: using {seed}")
    images = load_dataset(Path(dataset_dir), config, warnings)
    reg = None
    if config.reg_data_dir is not None:
        # kohya registers the regularization images after every training image, in the same dataset: they share
        # the buckets, the shuffles, the batches and the epoch length
        reg = load_reg_images(config.reg_data_dir, config, sum(image.repeats for image in images), warnings)
        images = images + reg.images
    if state is not None:
        check_state(state, config.raw, RESUME_IGNORED, dataset_digest(images))
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()) / "esd-trainer"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cuda_devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        return _train(
            config, Path(model_path), images, output_dir, work_dir, device, seed, warnings, started_at,
            on_progress, should_stop, state, reg, on_output, uploadable,
        )  # fmt: skip


def _check_uploadable(
    config: TrainingConfig, epochs: int, total_steps: int, uploadable: set[str], done_step: int, first_epoch: int
) -> None:
    """Fail before the first step when this run would write a file the job cannot upload (see :func:`train`).

    The files are :func:`output_file_names`' for the real epochs and steps, less those a resumed run does not write
    again (the epoch saves before ``first_epoch``, the step saves up to ``done_step``: the run before wrote them).
    """
    done: set[str] = set()
    for epoch in range(1, first_epoch):
        done |= {config.epoch_file(epoch), config.epoch_state_file(epoch)}
    if config.save_every_n_steps:
        for saved in range(config.save_every_n_steps, done_step + 1, config.save_every_n_steps):
            done |= {config.step_file(saved), config.step_state_file(saved)}
    missing = [name for name in output_file_names(config, epochs, total_steps) if name not in done | uploadable]
    if not missing:
        return
    first, more = missing[0], f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    every, interval, note = config.save_every_n_steps, config.save_every_n_epochs, ""
    step_names: set[str] = set()
    if every:
        for saved in range(every, total_steps + 1, every):
            step_names |= {config.step_file(saved), config.step_state_file(saved)}
    if first in step_names:
        saves = "step states" if first.endswith("-state.pt") else "step saves"
        option = f"save_every_n_steps = {every}" + (" with save_state" if saves == "step states" else "")
        why = f"{option} makes {total_steps // every} {saves}"
        note = " (the server presigns a bounded number of step saves)"
    elif interval and first not in (config.final_file(), config.final_state_file()):
        saves = "epoch states" if first.endswith("-state.pt") else "epoch saves"
        ratio = config.save_n_epoch_ratio
        option = f"save_n_epoch_ratio = {ratio}" if ratio else f"save_every_n_epochs = {interval}"
        option += " with save_state" if saves == "epoch states" else ""
        why = f"{option} makes {(epochs - 1) // interval} {saves}"
    elif first == config.final_file():
        why = "the run ends with its final file"
    else:
        why = "save_state / save_state_on_train_end make the final state"
    raise TrainingError(f"{why}: this job has no upload URL for {first}{more}{note}")


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
    resumed: dict | None = None,
    reg: RegImages | None = None,
    on_output: Output | None = None,
    uploadable: Collection[str] | None = None,
) -> TrainResult:
    """The training loop proper (see :func:`train`); runs inside a forked, seeded RNG. ``resumed`` is the state
    to continue from (checked against the config and dataset); ``reg`` the regularization images (already at the
    end of ``images``), for the metadata."""
    sampling = config.sample_prompts is not None and any(
        (config.sample_every_n_epochs, config.sample_every_n_steps, config.sample_at_first)
    )
    prompts = load_prompts(config.sample_prompts, config.sample_sampler, warnings) if sampling else []
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
    # kohya sets save_every_n_epochs from save_n_epoch_ratio once the epochs are known
    config = replace(config, save_every_n_epochs=config.epoch_interval(epochs))
    done_step, first_epoch, position = 0, 1, None
    if resumed is not None:
        if int(resumed["total_steps"]) != total_steps:
            raise TrainingError(
                f"resume: the state was saved in a run of {resumed['total_steps']} steps, this run has {total_steps}"
            )
        if int(resumed["step"]) >= total_steps:
            raise TrainingError(f"resume: the state is at step {resumed['step']} of {total_steps}: nothing is left")
        done_step = int(resumed["step"])
        # a step state is inside its epoch (``batch`` of its batches done): the run goes on in that epoch
        position = resumed.get("batch")
        first_epoch = int(resumed["epoch"]) + (1 if position is None else 0)
    if uploadable is not None:
        _check_uploadable(config, epochs, total_steps, set(uploadable), done_step, first_epoch)

    precision = _precision(config, device)
    weight_dtype = precision.weight_dtype
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
    if config.prior_loss_weight != 1.0 and reg is None:
        warnings.append("prior_loss_weight has no effect without reg_data_dir (as in kohya)")

    scheduler = model.noise_scheduler
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if config.v_parameterization is not None:
        prediction = "v_prediction" if config.v_parameterization else "epsilon"
    v_prediction = prediction == "v_prediction"
    check_prediction(config, v_prediction)
    num_timesteps = scheduler.config.num_train_timesteps
    _, max_timestep = timestep_range(config, num_timesteps)
    # kohya computes the SNR table before the zero-terminal fix: the loss weights keep the original SNR
    snr = snr_table(scheduler.alphas_cumprod).to(device)
    if config.zero_terminal_snr:
        enforce_zero_terminal_snr(scheduler)
        if not v_prediction:
            warnings.append("zero_terminal_snr is enabled without v_parameterization: training will be unexpected")

    network = create_network(model, config, warnings)  # base_weights merged, network_weights loaded
    if config.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in model.text_encoders:
                _checkpoint_text_encoder(encoder)
    model.unet.train(config.train_unet)
    for encoder in model.text_encoders:
        encoder.train(config.train_text_encoder)

    groups = network.param_groups(config)
    trainable = list(network.parameters())
    precision.cast(trainable)
    optimizer, optimizer_name = _optimizer(config, groups, warnings)
    lr_schedule = _lr_schedule(config, optimizer, total_steps, warnings)
    scaler = precision.scaler()

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

    metadata = _metadata(
        config, model, images, seed, epochs, total_steps, batches_per_epoch, optimizer_name, started_at, reg
    )
    metadata["ss_sd_model_name"] = model_path.name
    sample = SampleMaker(
        model, config, prompts, output_dir / "sample", device, prediction,
        lambda: torch.autocast(device_type=precision.device_type, dtype=weight_dtype, enabled=precision.autocast),
        lambda: _eval_weights(config, optimizer), warnings,
    )  # fmt: skip

    def output(kind: str, paths: list[Path], epoch: int | None, step: int, removed: bool = False) -> list[Path]:
        """Tell ``on_output`` of written (or removed) files; returns ``paths``."""
        for path in paths if on_output is not None else ():
            on_output({"kind": kind, "path": path, "epoch": epoch, "step": step, "removed": removed})
        return paths

    sample_files = output("sample", sample(network, 0, 0), 0, 0)  # kohya's sample_at_first
    written: list[Path] = []
    epoch_files: list[Path] = []
    state_files: list[Path] = []
    step_losses: list[float] = []  # every batch's loss, kept in the state
    step = 0
    loss_value = float("nan")

    def training_state(epoch: int, within: tuple[int, list[list[int]], list[float]] | None = None) -> dict:
        """What a resume needs to take the next step exactly as this run would (see :mod:`..state`). A state
        saved inside ``epoch`` (a step save) has ``within``: the batches done, the epoch's batches in their order
        (its shuffle cannot be drawn again: the RNGs have moved on) and the epoch's losses so far (the running
        mean goes on from them); an epoch-end state has ``batch`` None (``epoch`` is done)."""
        schedule = getattr(lr_schedule, "state_dict", None)
        done, order, losses = within if within is not None else (None, None, None)
        return {
            "seed": seed,
            "epoch": epoch,
            "batch": done,
            "batches": order,
            "epoch_losses": list(losses) if losses is not None else None,
            "step": step,
            "total_steps": total_steps,
            "network": {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "lr_schedule": schedule() if schedule is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rngs": rng_states(generator, rng, device),
            "losses": list(step_losses),
            "loss": loss_value,
            "config": comparable_config(config.raw, RESUME_IGNORED),
            "dataset": dataset_digest(images),
        }

    if resumed is not None:
        network.load_state_dict(resumed["network"])
        optimizer.load_state_dict(resumed["optimizer"])
        if resumed["lr_schedule"] is not None:
            lr_schedule.load_state_dict(resumed["lr_schedule"])
        if scaler is not None and resumed["scaler"] is not None:
            scaler.load_state_dict(resumed["scaler"])
        restore_rngs(resumed["rngs"], generator, rng, device)  # after the latent cache, which draws noise too
        step = done_step
        step_losses = [float(x) for x in resumed["losses"]]
        loss_value = float(resumed["loss"])
        # the run before saved these (they are not here): save_last_n_epochs(_state) rotates them out by name, as
        # kohya removes ``epoch - n * save_every_n_epochs``, so a resumed run keeps the same files an unbroken one does
        if config.save_every_n_epochs:
            earlier = [e for e in range(1, first_epoch) if e % config.save_every_n_epochs == 0]
            kept, kept_states = config.save_last_n_epochs, config.save_last_n_epochs_state or config.save_last_n_epochs
            epoch_files = [output_dir / config.epoch_file(e) for e in (earlier[-kept:] if kept else earlier)]
            if config.save_state:
                states = earlier[-kept_states:] if kept_states else earlier
                state_files = [output_dir / config.epoch_state_file(e) for e in states]

    def remove(kind: str, path: Path, epoch: int, step: int) -> None:
        """Rotate out an earlier save (this run's, or the run's before a resume: reported either way)."""
        path.unlink(missing_ok=True)
        if path in written:
            written.remove(path)
        output(kind, [path], epoch, step, removed=True)

    def save_step(epoch: int, within: tuple[int, list[list[int]], list[float]]) -> None:
        """kohya's save every ``save_every_n_steps``: the file (its ``ss_epoch`` the epochs done before this one,
        as kohya passes its 0-based epoch), with ``save_state`` the state and the state ``save_last_n_steps_state``
        (or ``save_last_n_steps``) rotates out, then the file ``save_last_n_steps`` rotates out, in kohya's order.
        The removals go by kohya's arithmetic on the step number, so a resumed run removes what an unbroken one
        would."""
        path = output_dir / config.step_file(step)
        with _eval_weights(config, optimizer):
            _save(path, network.kohya_state_dict(_save_dtype(config)), _finish(metadata, epoch - 1, step))
        written.append(path)
        output("model", [path], epoch, step)
        if config.save_state:  # kohya's save_and_remove_state_stepwise
            state_path = output_dir / config.step_state_file(step)
            save_state(state_path, training_state(epoch, within))
            written.append(state_path)
            output("state", [state_path], epoch, step)
            old = config.removed_step(step, config.save_last_n_steps_state or config.save_last_n_steps)
            if old is not None:
                remove("state", output_dir / config.step_state_file(old), epoch, step)
        old = config.removed_step(step, config.save_last_n_steps)
        if old is not None:
            remove("model", output_dir / config.step_file(old), epoch, step)

    for epoch in range(first_epoch, epochs + 1):
        if epoch == first_epoch and position is not None:  # resumed inside this epoch: its order, its losses
            assert resumed is not None
            batches = [[int(i) for i in batch] for batch in resumed["batches"]]
            epoch_losses = [float(x) for x in resumed["epoch_losses"]]
            skip = int(position)
        else:
            if buckets is not None:
                batches = buckets.batches(epoch)
            else:
                order = [index for index, image in enumerate(images) for _ in range(image.repeats)]
                rng.shuffle(order)
                size = config.train_batch_size
                batches = [order[i : i + size] for i in range(0, len(order), size)]
            epoch_losses = []
            skip = 0
        for number, batch_indexes in enumerate(batches[skip:], start=skip + 1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
            batch = [images[i] for i in batch_indexes]
            # per sample in kohya's __getitem__ order: the flip draw, the crop and color draws, the caption
            flips, pixels, captions = [], [], []
            for image in batch:
                flips.append(config.flip_aug and rng.random() < 0.5)
                if not config.cache_latents:
                    pixels.append(_pixels(image, config, rng, flips[-1]))
                captions.append(process_caption(image.caption, config, rng, epoch))
            if config.cache_latents:
                latents = torch.stack([cache[i, flipped] for i, flipped in zip(batch_indexes, flips, strict=True)])
            else:
                latents = latents_of(pixels)
            noise, noisy, timesteps = noisy_latents(config, scheduler, latents, generator, max_timestep)
            # kohya's loss_weights: prior_loss_weight for a regularization image, 1 for a training image
            weights = None
            if reg is not None:
                values = [config.prior_loss_weight if image.is_reg else 1.0 for image in batch]
                weights = torch.tensor(values, dtype=torch.float32, device=device)
            with torch.autocast(device_type=precision.device_type, dtype=weight_dtype, enabled=precision.autocast):
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
            target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
            loss = step_loss(
                prediction_out, target, timesteps, config, snr, scheduler.alphas_cumprod, num_timesteps, v_prediction,
                weights,
            )  # fmt: skip
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1}: lower the learning rate or use bf16/no "
                    "mixed precision"
                )
            epoch_losses.append(loss.item())
            step_losses.append(epoch_losses[-1])
            scaled = loss / config.gradient_accumulation_steps
            if scaled.requires_grad:  # module_dropout can leave every LoRA out of a step: then there is no gradient
                (scaler.scale(scaled) if scaler else scaled).backward()
            if number % config.gradient_accumulation_steps and number != len(batches):
                continue
            amp_step = scaler is not None and any(p.grad is not None for p in trainable)
            if amp_step:
                scaler.unscale_(optimizer)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            if amp_step:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if config.scale_weight_norms:
                network.apply_max_norm(config.scale_weight_norms)
            step += 1
            loss_value = sum(epoch_losses) / len(epoch_losses)
            if on_progress is not None:
                on_progress({"epoch": epoch, "epochs": epochs, "step": step, "steps": total_steps, "loss": loss_value})
            sample_files += output("sample", sample(network, None, step), epoch, step)  # every sample_every_n_steps
            if config.save_every_n_steps and step % config.save_every_n_steps == 0:  # after the samples, as kohya
                save_step(epoch, (number, batches, epoch_losses))
            if step >= total_steps:
                break
        sample_files += output("sample", sample(network, epoch, step), epoch, step)  # every sample_every_n_epochs
        last = epoch == epochs or step >= total_steps
        if last:
            break
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0:
            path = output_dir / config.epoch_file(epoch)
            with _eval_weights(config, optimizer):
                _save(path, network.kohya_state_dict(_save_dtype(config)), _finish(metadata, epoch, step))
            written.append(path)
            epoch_files.append(path)
            output("model", [path], epoch, step)
            if config.save_last_n_epochs is not None:
                while len(epoch_files) > config.save_last_n_epochs:
                    remove("model", epoch_files.pop(0), epoch, step)
            if config.save_state:  # kohya's save_and_remove_state_on_epoch_end
                path = output_dir / config.epoch_state_file(epoch)
                save_state(path, training_state(epoch))
                written.append(path)
                state_files.append(path)
                output("state", [path], epoch, step)
                keep = config.save_last_n_epochs_state or config.save_last_n_epochs
                while keep is not None and len(state_files) > keep:
                    remove("state", state_files.pop(0), epoch, step)
    if should_stop is not None and should_stop():
        raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
    final = output_dir / config.final_file()
    with _eval_weights(config, optimizer):
        _save(final, network.kohya_state_dict(_save_dtype(config)), _finish(metadata, epochs, step))
    written.append(final)
    output("model", [final], epochs, step)
    if config.save_state or config.save_state_on_train_end:  # kohya's save_state_on_train_end
        path = output_dir / config.final_state_file()
        save_state(path, training_state(epochs))
        written.append(path)
        output("state", [path], epochs, step)
    return TrainResult(
        files=written,
        warnings=warnings,
        loss=loss_value,
        seconds=time.time() - started_at,
        steps=step,
        epochs=epochs,
        family=model.family,
        seed=seed,
        samples=sample_files,
    )
