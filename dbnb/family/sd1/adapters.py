"""Which modules of SD 1.x get LoRA adapters: the module set kohya's `networks/lora.py` trains.

  UNet, always    every Linear and 1x1 conv inside the transformer blocks' Transformer2DModel:
                  proj_in, proj_out, attn1/attn2 to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2
  UNet, LoCon     (lora_conv_rank > 0) the ResNet blocks and the up/down samplers too: their 3x3
                  convs at lora_conv_rank, time_emb_proj and conv_shortcut at lora_rank
  text encoder    (lora_text_encoder_rank > 0) q/k/v/out_proj and mlp.fc1/fc2 of every layer
"""
from __future__ import annotations

from dbnb.family.base import AdapterTargets
from dbnb.family.lora import Spec, is_3x3, modules_inside

TRANSFORMER_BLOCKS = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def targets(unet, text_encoder, spec: Spec) -> AdapterTargets:
    linear = [n for n, _ in modules_inside(unet, TRANSFORMER_BLOCKS)]
    convs = []
    if spec.conv_rank:
        for name, module in modules_inside(unet, CONV_BLOCKS):
            (convs if is_3x3(module) else linear).append(name)
    return AdapterTargets(denoiser=linear, denoiser_convs=convs,
                          encoder=[n for n, _ in modules_inside(text_encoder, TEXT_BLOCKS)])
