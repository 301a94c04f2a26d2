"""The tiny SD 1.x models that tests, CI and `dbnb demo` train: no download, seconds on a CPU.

It keeps SD 1.5's *topology* — 4 UNet levels with 2 resnets each, cross-attention in the
first three, a ×8 VAE with a mid-block attention, a CLIP text encoder and the real CLIP
tokenizer — at small widths, so every key of the original layout has a counterpart and
every loading / export path is the real one. The plain tiny model's weights are random
(seeded): it proves the plumbing. The *world* model (`make_world_model`) is pretrained on
dbnb.evaluate.scorers.world's drawn characters and ships as package data: DreamBooth's effects show in it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dbnb.core.versions import dtype_argument
from dbnb.family.sd1.layout import original_state_dict, write_single_file
from dbnb.family.sd1.skeleton import (SKELETON, TINY_TEXT, TINY_UNET, TINY_VAE, WORLD_TEXT, WORLD_UNET, WORLD_VAE,
                                      save_tokenizer, skeleton_config)

TINY_RESOLUTION = 64
WORLD = Path(__file__).resolve().parents[1] / "assets" / "world"  # dbnb/assets: package data


def build_components(unet_config: dict, vae_config: dict, text_config: dict, seed: int = 0):
    """UNet, VAE and text encoder with seeded random weights, from config dicts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: loads diffusers
    from transformers import CLIPTextConfig, CLIPTextModel  # lazy: loads transformers

    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet = UNet2DConditionModel(**strip(unet_config))
        vae = AutoencoderKL(**strip(vae_config))
        text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config.items()
                                                       if k not in ("architectures", "torch_dtype")}))
    finally:
        torch.random.set_rng_state(generator_state)
    return unet, vae, text_encoder


def build_tiny_pipeline(seed: int = 0, widths: tuple[dict, dict, dict] = (TINY_UNET, TINY_VAE, TINY_TEXT)):
    """The tiny StableDiffusionPipeline (PNDM scheduler, no safety checker), in memory."""
    unet_widths, vae_widths, text_widths = widths
    unet, vae, text_encoder = build_components(
        skeleton_config("unet", **unet_widths), skeleton_config("vae", **vae_widths),
        skeleton_config("text_encoder", **text_widths), seed=seed)
    return assemble(unet, vae, text_encoder)


def build_world_pipeline(seed: int = 0):
    """The world model's topology with random weights: what scripts/pretrain_world.py starts from."""
    return build_tiny_pipeline(seed, (WORLD_UNET, WORLD_VAE, WORLD_TEXT))


def assemble(unet, vae, text_encoder):
    from diffusers import PNDMScheduler, StableDiffusionPipeline  # lazy: loads diffusers
    from transformers import CLIPTokenizer  # lazy: loads transformers

    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77),
        scheduler=PNDMScheduler.from_config(skeleton_config("scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def make_tiny_model(out_dir: str | Path, single_file: str | Path | None = None, seed: int = 0) -> Path:
    """Write the tiny model as a diffusers folder and, optionally, as one original-layout file."""
    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(pipe.tokenizer, out_dir / "tokenizer")
    if single_file is not None:
        state = original_state_dict(pipe.unet.state_dict(), pipe.vae.state_dict(),
                                    pipe.text_encoder.state_dict())
        write_single_file(single_file, state, metadata={"dbnb_model": "tiny", "seed": str(seed)})
    return out_dir


def make_world_model(out_dir: str | Path) -> Path:
    """Write the pretrained world model (package data, fp16) as an fp32 diffusers folder.

    Its weights come from scripts/pretrain_world.py; see dbnb.evaluate.scorers.world for what it knows.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: loads diffusers
    from transformers import CLIPTextModel  # lazy: loads transformers

    if not (WORLD / "unet" / "config.json").exists():
        raise FileNotFoundError(f"The pretrained world model is missing from {WORLD}: reinstall dbnb, or "
                                "rebuild it with `python scripts/pretrain_world.py`.")
    fp32, fp32_text = dtype_argument("diffusers", torch.float32), dtype_argument("transformers", torch.float32)
    pipe = assemble(UNet2DConditionModel.from_pretrained(WORLD / "unet", **fp32),
                    AutoencoderKL.from_pretrained(WORLD / "vae", **fp32),
                    CLIPTextModel.from_pretrained(WORLD / "text_encoder", **fp32_text))
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(pipe.tokenizer, out_dir / "tokenizer")
    return out_dir


def make_full_size_model(out_dir: str | Path, seed: int = 0) -> Path:
    """An SD 1.5-size diffusers folder with random weights, for benchmarks without a download."""
    pipe = build_tiny_pipeline(seed)  # tokenizer and scheduler; the three models are replaced full-size
    unet, vae, text_encoder = build_components(skeleton_config("unet"), skeleton_config("vae"),
                                               skeleton_config("text_encoder"), seed=seed)
    pipe.register_modules(unet=unet, vae=vae, text_encoder=text_encoder)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(pipe.tokenizer, Path(out_dir) / "tokenizer")
    return Path(out_dir)
