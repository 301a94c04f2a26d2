"""dbnb's tiny SDXL: SDXL's topology (two CLIP text encoders, the second with its pooled
projection; a UNet conditioned on text_time) at widths a CPU trains in seconds, saved as a
diffusers folder. Tests, bench and the notebooks' SDXL runs read it as users' SDXL bases are read.
"""
from __future__ import annotations

from pathlib import Path

import torch

WIDTHS = (32, 16)  # CLIP-L's and bigG's hidden sizes, tiny
PROJECTION = 16    # text_encoder_2's pooled projection: the UNet's text_embeds
TIME_EMBED = 8     # per time id: the UNet's added embedding reads 6 of them and the pooled text


def make_tiny_sdxl(folder: str | Path, widths: tuple[int, int] = WIDTHS, text_layers: int = 3) -> Path:
    """SDXL's topology at tiny widths, saved as a diffusers folder: the UNet's added conditioning
    is text_time, its cross-attention reads both encoders' widths side by side. `widths` and
    `text_layers` size the text encoders (bench/bench_text_cache.py: CLIP-L's and bigG's real widths)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from dbnb.family.sd1.skeleton import SKELETON, TINY_VAE, save_tokenizer, skeleton_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64), layers_per_block=1, attention_head_dim=(2, 2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
        cross_attention_dim=sum(widths), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=6 * TIME_EMBED + PROJECTION)
    vae = AutoencoderKL(**{k: v for k, v in skeleton_config("vae", **TINY_VAE).items() if not k.startswith("_")})
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    text = lambda width: CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_size=width,  # noqa: E731
                                        intermediate_size=2 * width, num_attention_heads=4,
                                        num_hidden_layers=text_layers, projection_dim=PROJECTION, hidden_act="gelu")
    tokenizer = CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77)
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(text(widths[0])),
        text_encoder_2=CLIPTextModelWithProjection(text(widths[1])), tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler.from_config(skeleton_config("scheduler")), add_watermarker=False)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        save_tokenizer(tokenizer, folder / name)
    return folder
