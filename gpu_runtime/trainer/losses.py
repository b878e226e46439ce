"""The loss of a training step as kohya's ``train_network.py`` computes it: the element-wise loss (``loss_type``
l2, l1, huber or smooth_l1 with its scheduled threshold), the mean per sample, then the per-sample weights
(min-SNR, v-prediction scaling, v-prediction-like loss, debiased estimation), then the batch mean."""

from __future__ import annotations

import math

import torch

from gpu_runtime.trainer.config import TrainingConfig

SNR_CAP = 1000.0  # kohya caps the SNR at 1000 where timestep 0 would give (near) infinity


def huber_threshold(
    schedule: str,
    huber_c: float,
    huber_scale: float,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
) -> torch.Tensor:
    """kohya's ``get_huber_threshold_if_needed``: the Huber ``c`` of every sample.

    ``constant``: ``huber_c * huber_scale``; ``exponential``: ``huber_scale * exp(log(huber_c) * t / T)``, from 1 at
    t=0 down to ``huber_c`` at t=T; ``snr``: ``(1 - huber_c) / (1 + sigma_t)**2 + huber_c`` with
    ``sigma_t = sqrt((1 - a_t) / a_t)`` (kohya applies no ``huber_scale`` there).
    """
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if schedule == "snr":
        alphas = alphas_cumprod.to(timesteps.device)[timesteps]
        sigmas = ((1.0 - alphas) / alphas) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """kohya's ``conditional_loss`` without reduction. ``huber``: ``2c(sqrt(d**2 + c**2) - c)`` (pseudo-Huber:
    quadratic below ``c``, linear above); ``smooth_l1``: ``2(sqrt(d**2 + c**2) - c)``; ``c`` is per sample."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(prediction, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs a Huber threshold")
        c = huber_c.view(-1, *([1] * (prediction.ndim - 1)))
        pseudo = torch.sqrt((prediction - target) ** 2 + c**2) - c
        return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo
    raise ValueError(f"unknown loss_type {loss_type!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR weighting (arXiv:2303.09556, kohya's ``apply_snr_weight``): ``min(snr, gamma) / snr`` for epsilon,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if v_prediction else clipped / snr


def v_prediction_scale(snr: torch.Tensor) -> torch.Tensor:
    """kohya's ``get_snr_scale``: ``snr / (snr + 1)`` with the SNR capped at 1000, the factor between a v-prediction
    loss and the matching noise-prediction loss."""
    capped = torch.minimum(snr, torch.ones_like(snr) * SNR_CAP)
    return capped / (capped + 1)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (arXiv:2310.08442, kohya's ``apply_debiased_estimation``): ``1 / sqrt(snr)`` for epsilon,
    ``1 / (snr + 1)`` for v-prediction, with the SNR capped at 1000."""
    capped = torch.minimum(snr, torch.ones_like(snr) * SNR_CAP)
    return 1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)


def weight_per_sample(
    loss: torch.Tensor, snr: torch.Tensor, config: TrainingConfig, v_prediction: bool
) -> torch.Tensor:
    """kohya's ``post_process_loss`` on per-sample losses, in kohya's order: min-SNR, v-prediction scaling,
    v-prediction-like loss, debiased estimation (``snr`` is each sample's SNR)."""
    if config.min_snr_gamma:
        loss = loss * min_snr_weight(snr, config.min_snr_gamma, v_prediction)
    if config.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_prediction_scale(snr)
    if config.v_pred_like_loss:
        loss = loss + loss / v_prediction_scale(snr) * config.v_pred_like_loss
    if config.debiased_estimation_loss:
        loss = debiased_weight(snr, v_prediction) * loss
    return loss


def step_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    config: TrainingConfig,
    snr: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
    v_prediction: bool,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """kohya's ``process_batch`` loss: element-wise loss in float32, mean per sample, times ``sample_weights``
    (kohya's ``loss_weights``: ``prior_loss_weight`` for regularization images, else 1), the per-sample weights,
    then the batch mean. ``snr`` is the SNR table (before any zero-terminal fix, as kohya computes it first);
    ``alphas_cumprod`` the schedule actually trained (the Huber ``snr`` schedule reads it)."""
    huber_c = None
    if config.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_threshold(
            config.huber_schedule, config.huber_c, config.huber_scale, timesteps, alphas_cumprod, num_train_timesteps
        )
    loss = elementwise_loss(prediction.float(), target.float(), config.loss_type, huber_c)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if sample_weights is not None:
        loss = loss * sample_weights
    loss = weight_per_sample(loss, snr.to(timesteps.device)[timesteps], config, v_prediction)
    return loss.mean()
