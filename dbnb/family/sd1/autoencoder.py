"""The VAE's precision: one rule for every path that runs it (latent cache, training batches,
class images, previews, test images): fp32.

SD 1.x VAEs, the anime ones above all (NAI's and its many merges), overflow in fp16: activations
pass fp16's 65504 and the result is NaN. A NaN decode is a black picture (a black class image
is then learnt as the prior, silently); a NaN encode is a NaN latent, which surfaces as
"diverged" at the first step. The VAE has 84 M weights against the UNet's 860 M and runs once
per picture, so fp32 costs little; the UNet and text encoder keep the run's mixed precision.
"""
from __future__ import annotations

import contextlib

import torch

DTYPE = torch.float32


def _in_fp32(vae):
    """`vae` in fp32 (converted in place once), run outside any autocast around the caller,
    which would otherwise run its convolutions in half precision anyway."""
    if vae.dtype != DTYPE:
        vae.to(DTYPE)
    device = vae.device.type
    return torch.autocast(device, enabled=False) if device in ("cuda", "cpu") else contextlib.nullcontext()


@torch.no_grad()
def encode(vae, images: torch.Tensor):
    """The latent distribution of `images` (in [-1, 1]), whatever their dtype or device."""
    with _in_fp32(vae):
        return vae.encode(images.to(vae.device, DTYPE)).latent_dist


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Pictures in [-1, 1] from unscaled latents (as the sampler leaves them)."""
    with _in_fp32(vae):
        return vae.decode(latents.to(vae.device, DTYPE) / vae.config.scaling_factor).sample
