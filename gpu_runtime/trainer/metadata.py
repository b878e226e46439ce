"""The metadata written into every saved LoRA file: kohya's ``ss_*`` keys and a few ``modelspec.*`` keys, which
A1111, ComfyUI and the additional-networks extension read."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from gpu_runtime.trainer.config import TrainingConfig
from gpu_runtime.trainer.dataset import RegImages, TrainImage, _tag_frequency
from gpu_runtime.trainer.network import _Model


def _metadata(
    config: TrainingConfig,
    model: _Model,
    images: list[TrainImage],
    seed: int,
    epochs: int,
    steps: int,
    batches_per_epoch: int,
    optimizer_name: str,
    started_at: float,
    reg: RegImages | None = None,
) -> dict[str, str]:
    """kohya's ``ss_*`` training metadata (strings, as safetensors requires), plus a few ``modelspec.*`` keys.

    ``images`` holds the regularization images too (the ones kohya registers, with its filled repeats): they count
    in the buckets, while ``ss_num_train_images`` and ``ss_dataset_dirs`` are the training images' only and the
    regularization folders go to ``ss_num_reg_images`` (with the folders' repeats) and ``ss_reg_dataset_dirs``, as
    kohya writes them."""
    width, height = config.resolution
    train_images = [image for image in images if not image.is_reg]
    dirs: dict[str, dict[str, int]] = {}
    for image in train_images:
        entry = dirs.setdefault(image.folder, {"n_repeats": image.repeats, "img_count": 0})
        entry["img_count"] += 1
    version = _base_model_version(model)
    architecture = {"sd_v1": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-768-v"}.get(
        version, "stable-diffusion-xl-v1-base"
    )
    meta: dict[str, Any] = {
        "ss_session_id": random.randrange(2**31),
        "ss_training_started_at": started_at,
        "ss_output_name": config.output_name,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.unet_lr,
        "ss_text_encoder_lr": config.text_encoder_lr,
        "ss_num_train_images": sum(image.repeats for image in train_images),
        "ss_num_reg_images": reg.num_reg_images if reg is not None else 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": epochs,
        "ss_batch_size_per_device": config.train_batch_size,
        "ss_total_batch_size": config.train_batch_size * config.gradient_accumulation_steps,  # kohya's product
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": steps,
        "ss_lr_warmup_steps": int(config.lr_warmup_steps) if config.lr_warmup_steps >= 1 else config.lr_warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_network_module": "networks.lora",
        "ss_network_dim": config.network_dim,
        "ss_network_alpha": config.network_alpha,
        "ss_network_dropout": config.network_dropout,
        "ss_scale_weight_norms": config.scale_weight_norms,
        "ss_network_train_unet_only": not config.train_text_encoder,
        "ss_mixed_precision": config.mixed_precision,
        "ss_full_fp16": config.full_fp16,
        "ss_v2": model.family == "sd2",
        "ss_base_model_version": version,
        "ss_clip_skip": config.clip_skip,
        "ss_max_token_length": config.max_token_length,
        "ss_cache_latents": config.cache_latents,
        "ss_seed": seed,
        "ss_lowram": False,
        "ss_noise_offset": config.noise_offset or None,
        "ss_multires_noise_iterations": config.multires_noise_iterations,
        "ss_multires_noise_discount": config.multires_noise_discount,
        "ss_adaptive_noise_scale": config.adaptive_noise_scale,
        "ss_zero_terminal_snr": config.zero_terminal_snr,
        "ss_min_snr_gamma": config.min_snr_gamma,
        "ss_training_comment": config.training_comment,
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_caption_dropout_rate": config.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": config.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": config.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": config.prior_loss_weight,
        "ss_ip_noise_gamma": config.ip_noise_gamma,
        "ss_debiased_estimation": config.debiased_estimation_loss,
        "ss_noise_offset_random_strength": config.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": config.ip_noise_gamma_random_strength,
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_scale": config.huber_scale,
        "ss_huber_c": config.huber_c,
        "ss_resolution": f"({width}, {height})",
        "ss_enable_bucket": config.enable_bucket,
        "ss_bucket_no_upscale": config.bucket_no_upscale,
        "ss_min_bucket_reso": config.min_bucket_reso,
        "ss_max_bucket_reso": config.max_bucket_reso,
        "ss_bucket_info": json.dumps(_bucket_info(images) if config.enable_bucket else None),
        "ss_resize_interpolation": config.resize_interpolation,
        "ss_shuffle_caption": config.shuffle_caption,
        "ss_keep_tokens": config.keep_tokens,
        "ss_flip_aug": config.flip_aug,
        "ss_color_aug": config.color_aug,
        "ss_random_crop": config.random_crop,
        "ss_tag_frequency": json.dumps(_merged_tag_frequency(train_images, reg)),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_reg_dataset_dirs": json.dumps(reg.dirs if reg is not None else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if model.xl else "diffusers",
        "modelspec.title": config.output_name,
        "modelspec.resolution": f"{width}x{height}",
    }
    if config.network_args:
        # kohya writes the network_args as given, plus its LyCORIS workaround key "dropout" (= network_dropout)
        args: dict[str, Any] = dict(config.network_args)
        if not config.dim_from_weights:
            args.setdefault("dropout", config.network_dropout)
        meta["ss_network_args"] = json.dumps(args)
    return {key: str(value) for key, value in meta.items()}


def _merged_tag_frequency(train_images: list[TrainImage], reg: RegImages | None) -> dict[str, dict[str, int]]:
    """kohya's one ``tag_frequency`` of the dataset: the training folders, then the regularization folders (every
    caption of them, used or not); a folder name in both counts the tags of both, as ``set_tag_frequency`` adds."""
    frequency = _tag_frequency(train_images)
    for folder, tags in (reg.tag_frequency if reg is not None else {}).items():
        merged = frequency.setdefault(folder, {})
        for tag, count in tags.items():
            merged[tag] = merged.get(tag, 0) + count
    return frequency


def _bucket_info(images: list[TrainImage]) -> dict[str, Any]:
    """kohya's ``bucket_info`` (``make_buckets``): per bucket in sorted order its resolution and image count with
    repeats, and the mean |aspect-ratio error| over the images without repeats (numpy's mean, as kohya takes it)."""
    import numpy as np

    counts: dict[tuple[int, int], int] = {}
    for image in images:
        counts[image.bucket] = counts.get(image.bucket, 0) + image.repeats
    buckets = {
        index: {"resolution": reso, "count": count} for index, (reso, count) in enumerate(sorted(counts.items()))
    }
    errors = np.abs(np.array([image.ar_error for image in images]))
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if len(errors) else 0}


def _base_model_version(model: _Model) -> str:
    """kohya's ``ss_base_model_version``, which A1111 and ComfyUI read to tell SD 1.x, 2.x and SDXL LoRAs apart."""
    if model.xl:
        return "sdxl_base_v1-0"
    return "sd_v2" if model.family == "sd2" else "sd_v1"


def _finish(metadata: dict[str, str], epoch: int, step: int) -> dict[str, str]:
    """The metadata of one saved file: which epoch/step it holds and when it was written."""
    finished = time.time()
    return {
        **metadata,
        "ss_epoch": str(epoch),
        "ss_steps": str(step),
        "ss_training_finished_at": str(finished),
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(finished)),
    }
