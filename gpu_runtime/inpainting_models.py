"""Inpainting checkpoints (a 9-channel UNet: the latents, the mask, the masked image's latents), run as A1111 runs
them inside the ordinary txt2img and img2img pipelines.

Why not diffusers' inpaint pipelines: they start an img2img from pure noise at strength 1, blend latents their own
way and do not take the k-diffusion samplers' img2img cut; A1111 instead runs its normal samplers and only adds
the "image conditioning" channels to every UNet call (``processing.txt2img_image_conditioning`` and
``inpainting_image_conditioning``). :class:`ConditionedUNet` does just that around the checkpoint's UNet for one
pipeline call, so every sampler, prompt-editing schedule and the refiner hand-over work unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

CONDITIONING_CHANNELS = 5  # the mask, then the masked image's four latent channels


def is_inpainting(unet: Any) -> bool:
    return int(unet.config.in_channels) == 4 + CONDITIONING_CHANNELS


class ConditionedUNet(torch.nn.Module):
    """A UNet that takes 4-channel latents and appends the image conditioning (one row per image, repeated for
    the pipeline's CFG halves). Its config says 4 input channels, so pipelines make 4-channel latents."""

    def __init__(self, inner: Any, conditioning: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.conditioning = conditioning
        from diffusers.configuration_utils import FrozenDict

        self._config = FrozenDict({**inner.config, "in_channels": 4})

    @property
    def config(self) -> Any:
        return self._config

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        extra = self.conditioning.to(sample.device, sample.dtype)
        extra = extra.repeat(sample.shape[0] // extra.shape[0], 1, 1, 1)
        return self.inner(torch.cat([sample, extra], dim=1), timestep, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def image_conditioning(
    vae: Any, images: list[Any] | None, masks: list[Any] | None, count: int, width: int, height: int
) -> torch.Tensor:
    """A1111's conditioning for an inpainting model: ``[mask, encode(image * (1 - mask))]`` at latent size.

    txt2img (``images`` None): the whole image is "masked" and the masked image is mid-grey. img2img without a mask:
    the same with a full mask (so the masked image is black... i.e. zero in [-1, 1]). With a mask: the prepared
    images and their rounded model-size masks (``inpainting_mask_weight`` 1). The masked image is encoded to its
    latent mean (A1111 draws a sample from the VAE's distribution with the global RNG).
    """
    if images is None:
        pixels = torch.zeros(count, 3, height, width)  # 0.5 grey in [0, 1] is 0 in [-1, 1]
        mask = torch.ones(count, 1, height, width)
    else:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1 for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if masks is None:
            mask = torch.ones(len(images), 1, height, width)
        else:
            values = [np.asarray(m.convert("L"), dtype=np.float32) / 255 for m in masks]
            mask = torch.from_numpy(np.stack(values))[:, None].round()
        pixels = pixels * (1 - mask)
    from gpu_runtime.vae import encode

    latents = (encode(vae, pixels).mode() * vae.config.scaling_factor).to(vae.dtype)
    small = torch.nn.functional.interpolate(mask.to(latents.device, latents.dtype), size=latents.shape[-2:])
    return torch.cat([small, latents], dim=1)
