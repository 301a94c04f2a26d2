"""diffusers → original (Stability's `sgm`) single-file layout for SDXL: the file AUTOMATIC1111's
webui, Forge and ComfyUI load.

    model.diffusion_model.*                        UNet            (sgm openaimodel.UNetModel)
    first_stage_model.*                            VAE             (as SD 1.x's)
    conditioner.embedders.0.transformer.text_model.*   CLIP-L      (transformers' CLIPTextModel layout)
    conditioner.embedders.1.model.*                OpenCLIP bigG   (open_clip's own layout)
    v_pred, ztsnr                                  empty markers: the base predicts velocity / was
                                                   trained to zero terminal SNR (ComfyUI's
                                                   supported_models.SDXL.model_type reads them)

The UNet and VAE maps are SD 1.x's (dbnb.family.sd1.layout: derived from the block structure, so
they hold at SDXL's depths) plus the added embedding of the size / crop time ids (`label_emb`, as
SDXL's reference conversion names it). bigG's attention keeps q, k and v in one `in_proj`, and its
text projection is a matrix the text is multiplied by (the Linear's weight, transposed). The
reference checkpoints also hold two constants no diffusers model has (CLIP-L's position ids,
bigG's logit scale); the webui's and ComfyUI's loaders expect them, so they are written too.
Mapping is strict, as SD 1.x's: a key with no counterpart raises ValueError.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Iterable, Mapping

import torch

from dbnb.family.base import FileParts, under
from dbnb.family.sd1 import layout as sd1

UNET, VAE = sd1.ORIGINAL_PREFIXES["unet"], sd1.ORIGINAL_PREFIXES["vae"]
CLIP_L = "conditioner.embedders.0.transformer."
BIGG = "conditioner.embedders.1.model."
ENCODERS = ("te1", "te2")  # the encoder role's two halves (dbnb.family.sdxl.family.ENCODERS): CLIP-L, bigG

# The time ids' added embedding: diffusers' add_embedding, sgm's label_emb Sequential(Sequential(linear, SiLU, linear)).
ADDED_EMBEDDING = MappingProxyType({"add_embedding.linear_1": "label_emb.0.0",
                                    "add_embedding.linear_2": "label_emb.0.2"})

# bigG's modules: transformers' name → open_clip's (per layer under transformer.resblocks.N).
_BIGG_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
             "text_projection.weight": "text_projection"}
_BIGG_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
               "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")  # concatenated in this order into attn.in_proj_{weight,bias}

POSITION_IDS = f"{CLIP_L}text_model.embeddings.position_ids"
LOGIT_SCALE = f"{BIGG}logit_scale"
LOGIT_SCALE_VALUE = math.log(100.0)  # CLIP's trained temperature (SDXL 1.0 base's value); unused in generation
V_PRED, ZTSNR = "v_pred", "ztsnr"
EPSILON = ("epsilon", False)  # (prediction_type, zero-terminal SNR) of a file with no markers: SDXL 1.0's own
# The parts as merges see them: both text encoders are one part; sgm names an EMA copy as ldm does.
FILE_PARTS = FileParts(prefixes=MappingProxyType({"unet": (UNET,), "vae": (VAE,),
                                                  "text_encoder": ("conditioner.embedders.",)}),
                       ema="model_ema.", renamed=MappingProxyType({}), exact=(POSITION_IDS,))


def unet_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers SDXL UNet key → `model.diffusion_model.*` key."""
    return sd1.unet_key_map(keys, extra=ADDED_EMBEDDING)


def clip_l_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key (with or without `text_model.`) → `conditioner.embedders.0.*` key."""
    prefix = sd1.ORIGINAL_PREFIXES["text_encoder"].removesuffix("text_model.")
    return {k: CLIP_L + v.removeprefix(prefix) for k, v in sd1.text_encoder_key_map(keys).items()}


def bigg_sources(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """`conditioner.embedders.1.model.*` key → the CLIPTextModelWithProjection keys it is made of
    (three for an in_proj, one otherwise). The `position_ids` buffer is derived, so left out."""
    out: dict[str, tuple[str, ...]] = {}
    by_bare = {k.removeprefix("text_model."): k for k in keys if not k.endswith("position_ids")}
    for n in sorted({int(k.split(".")[2]) for k in by_bare if k.startswith("encoder.layers.")}):
        for param in ("weight", "bias"):
            sources = tuple(f"encoder.layers.{n}.self_attn.{proj}.{param}" for proj in _QKV)
            out[f"{BIGG}transformer.resblocks.{n}.attn.in_proj_{param}"] = sources
            for ours, theirs in _BIGG_LAYER.items():
                out[f"{BIGG}transformer.resblocks.{n}.{theirs}.{param}"] = (f"encoder.layers.{n}.{ours}.{param}",)
    out |= {BIGG + theirs: (ours,) for ours, theirs in _BIGG_TOP.items()}
    needed = {source for sources in out.values() for source in sources}
    if needed != by_bare.keys():
        unknown, missing = sorted(by_bare.keys() - needed), sorted(needed - by_bare.keys())
        raise ValueError(f"text_encoder_2 is not an OpenCLIP bigG-shaped CLIPTextModelWithProjection: "
                         f"{'keys without a counterpart ' + str(unknown[:3]) if unknown else ''}"
                         f"{' missing ' + str(missing[:3]) if missing else ''}")
    return {target: tuple(by_bare[s] for s in sources) for target, sources in out.items()}


def bigg_tensor(target: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) > 1:
        return torch.cat(tensors)  # q, k, v: the only new tensors an export makes (3 x width² per layer)
    if target == BIGG + "text_projection":
        return tensors[0].T  # open_clip multiplies by it: x @ text_projection
    return tensors[0]


def split_encoders(encoder: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """The encoder role's state dict (a ModuleDict of te1, te2) as CLIP-L's and bigG's own."""
    halves = tuple(under(encoder, name) for name in ENCODERS)
    if sum(map(len, halves)) != len(encoder):
        stray = next(k for k in encoder if not k.startswith(tuple(f"{name}." for name in ENCODERS)))
        raise ValueError(f"encoder key {stray!r} belongs to neither SDXL text encoder ({', '.join(ENCODERS)})")
    return halves


def markers(prediction_type: str, zero_snr: bool) -> dict[str, torch.Tensor]:
    """The keys that tell loaders how the model samples: none for epsilon prediction."""
    if prediction_type != "v_prediction":
        return {}
    return {V_PRED: torch.tensor([]), **({ZTSNR: torch.tensor([])} if zero_snr else {})}


def sampling(keys: Iterable[str]) -> tuple[str, bool]:
    """(prediction_type, rescale_betas_zero_snr) a file's markers say, as ComfyUI reads them."""
    keys = set(keys)
    return ("v_prediction", ZTSNR in keys) if V_PRED in keys else EPSILON


def sampling_name(keys: Iterable[str]) -> str:
    """How a file of these keys samples, in words: "epsilon", "v-prediction" or "v-prediction with zero terminal SNR"."""
    prediction_type, zero_snr = sampling(keys)
    if prediction_type == EPSILON[0]:
        return prediction_type
    return "v-prediction" + (" with zero terminal SNR" if zero_snr else "")


def original_keys(unet: Mapping, vae: Mapping, encoder: Mapping, prediction: tuple[str, bool]) -> set[str]:
    """The keys `original_state_dict` of these parts holds, reading no tensor."""
    clip_l, bigg = split_encoders(encoder)
    return {*unet_key_map(unet).values(), *sd1.vae_key_map(vae).values(), *clip_l_key_map(clip_l).values(),
            POSITION_IDS, *bigg_sources(bigg), LOGIT_SCALE, *markers(*prediction)}


def original_state_dict(unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor],
                        encoder: Mapping[str, torch.Tensor], prediction: tuple[str, bool]) -> dict[str, torch.Tensor]:
    """One original-layout state dict of an SDXL's parts (the encoder role's te1 / te2 halves), with
    the markers of `prediction` ((prediction_type, zero_snr)). The callers' own tensors, but for
    bigG's q/k/v concatenations (~0.3 GB in fp16 at full size), so a 7 GB model is never held twice."""
    clip_l, bigg = split_encoders(encoder)
    out = {dst: unet[src] for src, dst in unet_key_map(unet).items()}
    out |= {dst: sd1.vae_tensor(dst, vae[src]) for src, dst in sd1.vae_key_map(vae).items()}
    out |= {dst: clip_l[src] for src, dst in clip_l_key_map(clip_l).items()}
    positions, _ = clip_l[next(k for k in clip_l if k.endswith("position_embedding.weight"))].shape
    out[POSITION_IDS] = torch.arange(positions)[None]
    out |= {dst: bigg_tensor(dst, [bigg[s] for s in sources]) for dst, sources in bigg_sources(bigg).items()}
    out[LOGIT_SCALE] = torch.tensor(LOGIT_SCALE_VALUE, dtype=out[BIGG + "text_projection"].dtype)
    return out | markers(*prediction)
