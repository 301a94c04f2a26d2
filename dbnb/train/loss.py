"""The diffusion loss, for any model family (dbnb.family.base.Family).

Noise, offset noise and timesteps are drawn from the micro-batch's (seed, step) generator in
this order; the family encodes the prompts (or the batch brings them, cached) and runs its
denoiser; the target is the noise, or the velocity for v-prediction; then the per-pixel MSE, the
alpha mask, min-SNR-γ and the prior-preservation split.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dbnb.core.config import Config
from dbnb.data.batches import MicroBatch, to_device
from dbnb.family.base import Family


def diffusion_loss(denoiser, encoder, noise_scheduler, batch: MicroBatch, config: Config, *, family: Family,
                   scaling_factor: float = 1.0, device="cpu", encode_with_grad: bool = False) -> torch.Tensor:
    """The loss of one micro-batch of `family`'s model."""
    g = batch.generator
    # Drawn on the host from the (seed, step) generator; copied without the host waiting.
    latents = to_device(batch.latents * scaling_factor, device)
    noise = torch.randn(latents.shape, generator=g)
    if config.offset_noise:
        noise = noise + config.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    noise = to_device(noise, device)
    timesteps = to_device(torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                        generator=g), device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if batch.conditioning is not None:  # cache_text_embeddings: looked up, the encoders are off the GPU
        conditioning = {k: to_device(v, device) for k, v in batch.conditioning.items()}
    else:
        with torch.set_grad_enabled(encode_with_grad):
            conditioning = family.encode_prompts(encoder, {k: to_device(v, device) for k, v in batch.inputs.items()},
                                                 clip_skip=config.clip_skip)
    pred = family.predict(denoiser, noisy, timesteps, conditioning).float()
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_pixel = F.mse_loss(pred, target.float(), reduction="none")
    if batch.mask is not None:  # alpha_mask_loss: kohya's apply_masked_loss (weights, then the plain mean)
        mask = to_device(batch.mask, per_pixel.device).to(per_pixel.dtype)
        per_pixel = per_pixel * F.interpolate(mask, size=per_pixel.shape[-2:], mode="area")
    per_sample = per_pixel.mean(dim=(1, 2, 3))
    if config.snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
    if config.with_prior_preservation:
        instance, klass = per_sample.chunk(2)
        return instance.mean() + config.prior_loss_weight * klass.mean()
    return per_sample.mean()


def min_snr_weights(noise_scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): weight min(SNR, γ)/SNR, or /(SNR+1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return (torch.clamp(snr, max=gamma) / (snr + 1)).float()
    return (torch.clamp(snr, max=gamma) / snr).float()
