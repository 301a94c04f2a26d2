"""SD 1.x's parts built without weights, for the memory planner (dbnb.train.planner): the UNet,
text encoder and VAE from the model's own config files (a diffusers folder's, else SD 1.5's
shipped ones, which every SD 1.x checkpoint shares), set up to train by the same
`dbnb.family.sd1.family.set_up` as `SD1Family.load` — what is frozen and in which dtype, the LoRA
adapters, gradient checkpointing.

They are built on the meta device (no memory, no weights); the planner turns them into fake
tensors and runs the family's own encode / predict on them.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dbnb.family.sd1.family import set_up
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

    source = config.pretrained_model_name_or_path
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_config(source, "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**component_config(source, "text_encoder")))
        vae = AutoencoderKL.from_config(component_config(source, "vae"))  # fp32 as built: autoencoder.DTYPE
    with torch.device("meta"), warnings.catch_warnings():  # meta: the adapters too
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames gradient_checkpointing_enable
        set_up(unet, text_encoder, vae, config, weight_dtype)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return EmptyParts(denoiser=unet, encoder=text_encoder, autoencoder=vae, token_inputs={"input_ids": (TOKENS,)},
                      latent_channels=unet.config.in_channels, latent_factor=factor)
