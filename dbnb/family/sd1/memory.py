"""SD 1.x's parts built without weights, for the memory planner (dbnb.train.planner): the UNet,
text encoder and VAE from the model's own config files (a diffusers folder's, else SD 1.5's
shipped ones, which every SD 1.x checkpoint shares), set up to train as `SD1Family.load` sets
them up — what is frozen and in which dtype, the LoRA adapters, gradient checkpointing.

They are built on the meta device (no memory, no weights); the planner turns them into fake
tensors and runs the family's own encode / predict on them. Kept beside `SD1Family.load` rather than in it
so the seam stays as it is; each rule below mirrors a line there and must change with it.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dbnb.family.sd1.skeleton import skeleton_config

TOKENS = 77  # CLIP's context: every SD 1.x prompt is padded to it


@dataclass
class EmptyParts:
    denoiser: torch.nn.Module
    encoder: torch.nn.Module
    autoencoder: torch.nn.Module
    token_inputs: dict[str, tuple[int, ...]]  # each token input's shape for one row of the batch
    latent_channels: int
    latent_factor: int                        # pixels per latent pixel along a side


def component_config(source: str, component: str) -> dict:
    """`component`'s config.json in the diffusers folder `source`, else SD 1.5's."""
    own = Path(source) / component / "config.json" if source else None
    if own is not None and own.is_file():
        return json.loads(own.read_text())
    return skeleton_config(component)


def empty_parts(config, weight_dtype: torch.dtype) -> EmptyParts:
    """The parts of `config`'s base model on the meta device, set up as for training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: diffusers, off the light paths
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbnb.family import lora

    source = config.pretrained_model_name_or_path
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_config(source, "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**component_config(source, "text_encoder")))
        vae = AutoencoderKL.from_config(component_config(source, "vae"))  # fp32 as built: autoencoder.DTYPE
    # As SD1Family.load: the frozen parts in the mixed-precision dtype, trained ones in fp32.
    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.fine_tunes_text_encoder)
    if weight_dtype != torch.float32:
        if not config.fine_tunes_text_encoder:
            text_encoder.to(dtype=weight_dtype)
        if config.use_lora:
            unet.to(dtype=weight_dtype)
    if config.use_lora:
        with torch.device("meta"):
            lora.add_adapters(unet, text_encoder, lora.Spec.from_config(config), seed=config.seed)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.trains_text_encoder:
            with warnings.catch_warnings():  # transformers renames it; SD1Family.load calls this one
                warnings.simplefilter("ignore", FutureWarning)
                text_encoder.gradient_checkpointing_enable()
            if config.use_lora:
                text_encoder.enable_input_require_grads()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return EmptyParts(denoiser=unet, encoder=text_encoder, autoencoder=vae, token_inputs={"input_ids": (TOKENS,)},
                      latent_channels=unet.config.in_channels, latent_factor=factor)
