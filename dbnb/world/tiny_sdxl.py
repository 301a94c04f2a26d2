"""dbnb's tiny SDXL: SDXL's topology (two CLIP text encoders, the second with its pooled
projection; a UNet conditioned on text_time) at widths a CPU trains in seconds, saved as a
diffusers folder. Tests, bench and the notebooks' SDXL runs read it as users' SDXL bases are read.
Its widths are dbnb.family.sdxl.skeleton.TINY, so its single files load offline as SDXL's do.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dbnb.family.sdxl.skeleton import SKELETON, TINY, TINY_PROJECTION, TINY_WIDTHS, skeleton_config

WIDTHS, PROJECTION = TINY_WIDTHS, TINY_PROJECTION  # the encoders' hidden sizes and the pooled projection


def _config(part: str, **overrides) -> dict:
    return {k: v for k, v in skeleton_config(part, **{**TINY[part], **overrides}).items() if not k.startswith("_")}


def make_tiny_sdxl(folder: str | Path, widths: tuple[int, int] = WIDTHS, text_layers: int = 3) -> Path:
    """SDXL's topology at tiny widths, saved as a diffusers folder: the UNet's added conditioning
    is text_time, its cross-attention reads both encoders' widths side by side. `widths` and
    `text_layers` size the text encoders (bench/bench_text_cache.py: CLIP-L's and bigG's real widths)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dbnb.family.sd1.skeleton import save_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_config("unet", cross_attention_dim=sum(widths)))
    vae = AutoencoderKL(**_config("vae"))
    text = lambda part, width: CLIPTextConfig(**_config(  # noqa: E731
        part, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers))
    tokenizers = [CLIPTokenizer.from_pretrained(SKELETON / name, model_max_length=77)
                  for name in ("tokenizer", "tokenizer_2")]
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(text("text_encoder", widths[0])),
        text_encoder_2=CLIPTextModelWithProjection(text("text_encoder_2", widths[1])), tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], scheduler=EulerDiscreteScheduler.from_config(skeleton_config("scheduler")),
        add_watermarker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), tokenizers):
        save_tokenizer(tokenizer, folder / name)
    return folder
