"""SDXL's parts built without weights, for the memory planner (dbnb.train.planner), and the
memory rules memory_profile=auto follows for SDXL (dbnb.train.memory).

The UNet, both text encoders (CLIP-L; bigG with its projection) and the VAE are built from the
model's own config files (a diffusers folder's, else SDXL 1.0 base's shipped in dbnb/assets/sdxl,
which every SDXL-family base shares), on the meta device, and set up to train by the same
`dbnb.family.sdxl.family.set_up` as `SDXLFamily.load`.

The rules: SDXL's UNet is 2.6 B parameters, so a full fine-tune keeps 10 GB of fp32 master weights
and as much again of gradients before the optimizer's state: dbnb trains it only on a 40 GB card
and asks for LoRA below. auto tries the latents cached first (faster; the fp32 VAE then leaves the
GPU), then encoded at each step: the cache encodes pictures in chunks, and at 1024 px a chunk's
fp32 VAE activations (2.5 GiB a picture) can outgrow a card the step fits. Where the encoders
are frozen, the text embeddings are cached too (`cache_text_embeddings`: their 0.8 B weights
then leave the GPU).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from dbnb.core.config import FULL_FINE_TUNE_GIB
from dbnb.family.base import Models
from dbnb.family.sd1.memory import TOKENS, EmptyParts
from dbnb.family.sdxl.family import ENCODERS, LATENT_FACTOR, TOKEN_INPUTS, set_up

SKELETON = Path(__file__).resolve().parents[2] / "assets" / "sdxl"  # SDXL 1.0 base's configs: package data
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
FULL_FINE_TUNE_MIN_GIB = FULL_FINE_TUNE_GIB["sdxl"]  # the least card a full SDXL fine-tune is planned on


def component_config(source: str, component: str) -> dict:
    """`component`'s config.json in the diffusers folder `source`, else SDXL 1.0 base's."""
    own = Path(source) / component / "config.json" if source else None
    path = own if own is not None and own.is_file() else SKELETON / component / "config.json"
    return json.loads(path.read_text())


def part_configs(source: str) -> dict[str, dict]:
    return {component: component_config(source, component) for component in COMPONENTS}


def empty_parts(config, weight_dtype: torch.dtype) -> EmptyParts:
    """The parts of `config`'s SDXL base model on the meta device, set up as for training."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: diffusers, off the light paths
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shapes = part_configs(config.pretrained_model_name_or_path)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shapes["unet"])
        encoders = torch.nn.ModuleDict(dict(zip(ENCODERS, (
            CLIPTextModel(CLIPTextConfig(**shapes["text_encoder"])),
            CLIPTextModelWithProjection(CLIPTextConfig(**shapes["text_encoder_2"]))))))
        vae = AutoencoderKL.from_config(shapes["vae"])  # fp32 as built: dbnb.family.sd1.autoencoder.DTYPE
    models = Models(denoiser=unet, encoder=encoders, autoencoder=vae, tokenizers={}, noise_scheduler=None,
                    latent_scale=vae.config.scaling_factor, pipe=None, base={})
    with torch.device("meta"), warnings.catch_warnings():  # meta: the adapters too
        warnings.simplefilter("ignore", FutureWarning)  # transformers renames gradient_checkpointing_enable
        set_up(models, config, weight_dtype)
    return EmptyParts(denoiser=unet, encoder=encoders, autoencoder=vae,
                      token_inputs={name: (TOKENS,) for name in TOKEN_INPUTS},
                      latent_channels=unet.config.in_channels, latent_factor=LATENT_FACTOR)


def auto_settings(config) -> list[dict]:
    """memory_profile=auto's SDXL tiers besides precision, 8-bit Adam and checkpointing, fastest
    first: the latents cached, then encoded at each step; both with the text embeddings cached
    (cache_text_embeddings: the encoders off the GPU) where the encoders are frozen."""
    text = {"cache_text_embeddings": True} if not config.trains_text_encoder else {}
    return [{"cache_latents": True, **text}, {"cache_latents": False, **text}]


def refusal(config, gpu: dict) -> str | None:
    """Why `config` is not trained on `gpu` (name, total_vram_gib), or None: a full SDXL fine-tune
    below a 40 GB card."""
    total = float(gpu["total_vram_gib"])
    if config.use_lora or total >= FULL_FINE_TUNE_MIN_GIB:
        return None
    return (f"{gpu.get('name', 'this GPU')} ({total:.1f} GiB): a full SDXL fine-tune (use_lora=false) needs a 40 GB "
            f"card (A100 40 GB or larger; dbnb plans it from {FULL_FINE_TUNE_MIN_GIB:g} GiB). Set use_lora=true "
            "(memory_profile=auto then fits SDXL LoRA on a 16 GB T4), or train on a 40 GB+ GPU.")


def load_ram(trace) -> int:
    """System RAM (bytes) SDXLFamily.load holds on the host: each part read in the dtype it trains in
    (dbnb.family.sdxl.family.load_dtypes), so the planner's trace (dbnb.train.steptrace.StepTrace) of
    the parts as set up says it."""
    return trace.weights + trace.autoencoder


def export_ram(trace) -> int:
    """System RAM (bytes) `dbnb export` of a full SDXL run, or the read-back of its LoRA file, holds:
    the parts once, in fp16 (the file's state dict is views of them but bigG's joined q/k/v, and the
    read-back starts after they are dropped: dbnb.ship.export.verify). bench/bench_sdxl_ram.py
    measured 7.7 and 7.5 GiB peak for a full-size SDXL on a 2-core CPU box."""
    return 2 * trace.parameters
