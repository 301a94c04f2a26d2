"""Which sources are SDXL models, and loading one as a StableDiffusionXLPipeline.

A diffusers folder is SDXL when its model_index.json names StableDiffusionXLPipeline or its UNet
is conditioned on the size / crop time ids (addition_embed_type "text_time", which no SD 1.x or
2.x UNet has); a single .safetensors when it holds the original layout's second text encoder
(`conditioner.embedders.*`). Folders load; single files and Hub ids are refused for now with
what to do (convert to a folder), since no SDXL config skeleton ships yet.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dbnb.core.versions import dtype_argument
from dbnb.family.sd1.load import SDXL_TO_FOLDER, ModelLoadError, check_folder, load_vae, resolve_source
from dbnb.family.sd1.singlefile import keys_and_shapes

PIPELINE_CLASS = "StableDiffusionXLPipeline"
TIME_IDS_EMBEDDING = "text_time"  # the UNet's addition_embed_type: its added conditioning is pooled text + time ids
SINGLE_FILE_MARK = "conditioner.embedders."  # the original layout's text encoders (SD 1.x: cond_stage_model.)
# As dbnb.family.sd1.load.FOLDER_PARTS: the parts of an SDXL folder, each with the files it cannot do without
FOLDER_PARTS = {"unet": [("config.json",)], "vae": [("config.json",)], "text_encoder": [("config.json",)],
                "text_encoder_2": [("config.json",)], "scheduler": [("scheduler_config.json",)],
                "tokenizer": [("vocab.json", "merges.txt"), ("tokenizer.json",)],
                "tokenizer_2": [("vocab.json", "merges.txt"), ("tokenizer.json",)]}
FINGERPRINT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_sdxl(source: str) -> bool:
    """Whether `source` is an SDXL model dbnb can tell offline: a diffusers folder or a single
    .safetensors (read from its header). Hub ids and other files say no: SD 1.x's loader names them."""
    path = Path(str(source)).expanduser()
    if path.is_dir():
        unet = _json(path / "unet" / "config.json")
        return (_json(path / "model_index.json").get("_class_name") == PIPELINE_CLASS
                or unet.get("addition_embed_type") == TIME_IDS_EMBEDDING)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        try:
            keys, _ = keys_and_shapes(path)
        except Exception:  # noqa: BLE001 — a damaged file is not recognized here; SD 1.x's loader names the damage
            return False
        return any(k.startswith(SINGLE_FILE_MARK) for k in keys)
    return False


def load_pipeline(source: str, vae: str = "", revision: str = "", dtype=None):
    """A `StableDiffusionXLPipeline` (fp32 unless `dtype`: one, or one per part by name with a
    "default", as diffusers takes it) from an SDXL diffusers folder, with the VAE at `vae` in place
    of its own when given (an fp16-fix VAE: the same latent space)."""
    from diffusers import StableDiffusionXLPipeline

    kind, where = resolve_source(source)
    if kind != "folder":
        raise ModelLoadError(
            f"{source!r} is an SDXL {'single file' if kind == 'file' else 'Hub model'}: dbnb trains SDXL from a "
            f"diffusers folder only (single files and Hub ids are not supported yet). {SDXL_TO_FOLDER}")
    check_folder(Path(where), FOLDER_PARTS)
    extra = {"revision": revision} if revision else {}
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            where, local_files_only=True, token=os.environ.get("HF_TOKEN") or None, add_watermarker=False,
            **dtype_argument("diffusers", dtype or torch.float32), **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not load SDXL base model {source!r}: {e}") from e
    if vae:
        scaling = pipe.vae.config.scaling_factor
        pipe.vae = load_vae(vae, revision=revision, dtype=dtype.get("vae", dtype.get("default")) if isinstance(
            dtype, dict) else dtype)
        # a VAE file is read with SD 1.5's config (0.18215); an SDXL VAE keeps the base's latent scale
        pipe.vae.register_to_config(scaling_factor=scaling)
    return pipe
