"""The noise side of a training step as kohya's ``train_network.py`` does it: the noise (offset, adaptive offset,
multi-resolution "pyramid" noise, input perturbation), the timesteps a batch is noised at, the SNR table the loss
weights read and the zero-terminal-SNR fix of the schedule.

Every random draw comes from the caller's :class:`torch.Generator` (kohya uses the global RNGs), in kohya's order,
so a seeded run is reproducible and a run with every option off draws exactly what it drew before these options
existed: the noise, then the timesteps.
"""

from __future__ import annotations

from typing import Any

import torch

from gpu_runtime.trainer.config import TrainingConfig


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on its device), moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _strength(maximum: float, random_strength: bool, generator: torch.Generator, like: torch.Tensor) -> Any:
    """kohya's ``*_random_strength``: one uniform strength in [0, maximum) per batch, else ``maximum`` itself."""
    if not random_strength:
        return maximum
    return (torch.rand(1, generator=generator) * maximum).to(device=like.device, dtype=like.dtype)


def offset_noise(
    noise: torch.Tensor,
    latents: torch.Tensor,
    offset: float | torch.Tensor,
    generator: torch.Generator,
    adaptive_scale: float | None = None,
) -> torch.Tensor:
    """Offset noise (crosslabs.org "diffusion with offset noise"; kohya's ``apply_noise_offset``): add
    ``offset * N(0, 1)`` per sample and channel, constant over the image, so the model learns to shift mean
    brightness. ``adaptive_scale`` raises the offset by ``adaptive_scale * |mean of the latent channel|`` (clamped at
    0, for negative scales)."""
    if adaptive_scale is not None:
        channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(offset + adaptive_scale * channel_mean, min=0.0)
    return noise + offset * _randn((latents.shape[0], latents.shape[1], 1, 1), generator, noise)


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (kohya's ``pyramid_noise_like``): level ``i`` adds noise drawn at the size divided by
    ``r**i`` (``r`` uniform in [2, 4) per level), bilinearly upsampled and weighted ``discount**i``; it stops after a
    level that is 1 pixel high or wide, and the sum is rescaled to unit standard deviation over the whole batch."""
    batch, channels, height, width = noise.shape
    upsample = torch.nn.Upsample(size=(height, width), mode="bilinear")
    total = noise
    for level in range(iterations):
        ratio = float(torch.rand(1, generator=generator)) * 2 + 2
        level_height = max(1, int(height / ratio**level))
        level_width = max(1, int(width / ratio**level))
        coarse = _randn((batch, channels, level_height, level_width), generator, noise)
        total = total + upsample(coarse) * discount**level
        if level_height == 1 or level_width == 1:
            break
    return total / total.std()


def sample_timesteps(minimum: int, maximum: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """kohya's ``get_timesteps``: uniform integers in [minimum, maximum), or ``maximum`` for every sample when the
    range is empty (``min_timestep == max_timestep`` trains a single timestep)."""
    if minimum < maximum:
        return torch.randint(minimum, maximum, (batch,), generator=generator)
    return torch.full((batch,), maximum, dtype=torch.long)


def snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio of every timestep, ``(sqrt(a) / sqrt(1 - a))**2`` as kohya's
    ``prepare_scheduler_for_custom_training`` computes it (same rounding as kohya)."""
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last cumulative alpha is exactly 0 (arXiv:2305.08891, kohya's ``enforce_zero_terminal_snr``):
    ``sqrt(alpha_bar)`` is shifted so the last value is 0 and rescaled so the first keeps its value."""
    root = (1 - betas).cumprod(0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def enforce_zero_terminal_snr(scheduler: Any) -> None:
    """kohya's ``fix_noise_scheduler_betas_for_zero_terminal_snr``: replace the DDPM scheduler's betas, alphas and
    cumulative alphas in place, so ``add_noise`` and ``get_velocity`` use the fixed schedule."""
    betas = zero_terminal_snr_betas(scheduler.betas)
    scheduler.betas = betas
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


def noisy_latents(
    config: TrainingConfig,
    scheduler: Any,
    latents: torch.Tensor,
    generator: torch.Generator,
    max_timestep: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kohya's ``get_noise_noisy_latents_and_timesteps``: ``(noise, noisy latents, timesteps)`` for one batch.

    The returned noise (the epsilon target) includes the offset and pyramid noise; input perturbation
    (``ip_noise_gamma``) only perturbs what is added to the latents, not the target.
    """
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if config.noise_offset:
        offset = _strength(config.noise_offset, config.noise_offset_random_strength, generator, noise)
        noise = offset_noise(noise, latents, offset, generator, config.adaptive_noise_scale)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, generator, config.multires_noise_iterations, config.multires_noise_discount)
    timesteps = sample_timesteps(config.min_timestep, max_timestep, latents.shape[0], generator).to(latents.device)
    added = noise
    if config.ip_noise_gamma:
        gamma = _strength(config.ip_noise_gamma, config.ip_noise_gamma_random_strength, generator, noise)
        added = noise + gamma * _randn(tuple(latents.shape), generator, noise)
    return noise, scheduler.add_noise(latents, added, timesteps), timesteps
