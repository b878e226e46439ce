"""Encoding images with a checkpoint's VAE the way A1111 does it: SDXL's VAE (``force_upcast``) overflows in half
precision, so it encodes in float32 and gets its dtype back whatever happens. Shared by inpainting, the
inpainting models' conditioning and img2img's latent resize."""

from __future__ import annotations

from typing import Any


def encode(vae: Any, pixels: Any) -> Any:
    """The latent distribution of ``pixels`` ([-1, 1], N x 3 x H x W, any device); its tensors are float32 when
    the VAE was upcast. The caller scales by ``vae.config.scaling_factor``."""
    import torch

    dtype = vae.dtype
    upcast = dtype != torch.float32 and getattr(vae.config, "force_upcast", False)
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.inference_mode():
            return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    finally:
        if vae.dtype != dtype:
            vae.to(dtype)
