"""Load an SD 1.x base model from wherever users keep one (dbnb.family.source finds it).

One entry point, `load_pipeline(source)`, for a diffusers folder, a Hugging Face repo id,
a single `.safetensors` / `.ckpt` in the original layout, an `https://` URL or a Google
Drive link. Single files are read with the SD 1.5 config skeleton shipped in the package,
so no Hub access is needed; `.ckpt` pickles are only ever opened with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from dbnb.core import weights
from dbnb.core.platform import default_cache_dir
from dbnb.core.versions import dtype_argument
from dbnb.core.weights import UnsafeCheckpointError, WeightFileError, read_state_dict  # noqa: F401 (re-exported)
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.source import ModelLoadError, resolve_source, resolve_source_vae
from dbnb.family.sd1.skeleton import SKELETON, VARIANTS, config_folder, save_tokenizer, skeleton_config

# What to do with an SDXL model the SD 1.x loader was given: dbnb.family.sdxl recognizes folders, files, URLs and
# Hub ids it can read, so this one came by another way (a Hub model the Hub did not show, offline and not cached)
SDXL_BY_PATH = ("Set pretrained_model_name_or_path to the SDXL model's .safetensors file or diffusers folder (or its "
                "URL), which dbnb reads as SDXL; a Hub id offline needs the model in the Hugging Face cache.")


# --- reading single files safely -----------------------------------------------------------

def load_checkpoint_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a single file, never executing code from a pickle (dbnb.core.weights)."""
    return read_state_dict(path)


# The two UNet shapes that tell SD 1.5 and dbnb's small models apart (original layout).
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
LEVEL1_CONV = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
# A VAE file's first conv, bare (a VAE-only file) or inside a whole checkpoint.
VAE_CONV_IN = ("encoder.conv_in.weight", "first_stage_model.encoder.conv_in.weight")


def sd1_variant(keys, shapes: dict) -> str:
    """'sd15', 'tiny' or 'world' for an original-layout SD 1.x state dict; a clear error otherwise."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.") for k in keys) or "model.diffusion_model.label_emb.0.0.weight" in keys:
        raise ModelLoadError("This is an SDXL model in one file, not SD 1.x: dbnb reads it as SDXL when it is "
                             "pretrained_model_name_or_path (training, rendering, export, convert, merge). "
                             f"{SDXL_BY_PATH}")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelLoadError("This is an SD 2.x model (OpenCLIP text encoder): dbnb trains SD 1.x only "
                             "(not supported yet).")
    conv_in = shapes.get(CONV_IN)
    if conv_in is None:
        raise ModelLoadError("No UNet found (no model.diffusion_model.* keys): this is not an SD 1.x "
                             "checkpoint in the original layout (a VAE or LoRA file?).")
    width = conv_in[0]
    if width == skeleton_config("unet")["block_out_channels"][0]:
        return "sd15"
    # The small variants share the first width; the second level's width tells them apart.
    level1 = shapes.get(LEVEL1_CONV)
    for variant, (unet, _, _) in VARIANTS.items():
        widths = unet["block_out_channels"]
        if width == widths[0] and (level1 is None or level1[0] == widths[1]):
            return variant
    raise ModelLoadError(f"UNet width {width} is not SD 1.x's 320; dbnb supports SD 1.x models only.")


def vae_variant(shapes: dict, source: str) -> str:
    """'sd15', 'tiny' or 'world' for a VAE file, by its first conv's width."""
    conv_in = next((shapes[k] for k in VAE_CONV_IN if k in shapes), None)
    if conv_in is None:
        raise ModelLoadError(f"VAE {source!r}: no encoder.conv_in.weight, so this is not an SD 1.x VAE file. "
                             "Set pretrained_vae_name_or_path to a VAE .safetensors, a VAE folder or ''.")
    widths = {"sd15": skeleton_config("vae")} | {v: skeleton_config("vae", **w[1]) for v, w in VARIANTS.items()}
    for variant, config in widths.items():
        if conv_in[0] == config["block_out_channels"][0]:
            return variant
    raise ModelLoadError(f"VAE {source!r}: encoder width {conv_in[0]} is not SD 1.x's 128; use an SD 1.x VAE.")


def skeleton_folder(variant: str, cache_dir: str | Path | None) -> Path:
    """The config-only diffusers folder that `from_single_file` reads instead of the Hub."""
    if variant == "sd15":
        return SKELETON
    from transformers import CLIPTokenizer

    def fill(tmp: Path) -> None:
        shutil.copy(SKELETON / "model_index.json", tmp / "model_index.json")
        save_tokenizer(CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77), tmp / "tokenizer")

    widths = dict(zip(("unet", "vae", "text_encoder"), VARIANTS[variant]), scheduler={})
    return config_folder(Path(cache_dir or default_cache_dir()) / f"skeleton-{variant}",
                         {part: skeleton_config(part, **over) for part, over in widths.items()}, fill)


# --- the one loader ------------------------------------------------------------------------

def load_pipeline(source: str, vae: str = "", revision: str = "", dtype=None,
                  cache_dir: str | Path | None = None):
    """An SD 1.x `StableDiffusionPipeline` (no safety checker) from any supported source."""
    from diffusers import StableDiffusionPipeline

    kind, where = resolve_source(source, cache_dir, revision=revision)
    if vae:  # a wrong VAE is named before the minutes the base model takes to load
        resolve_source_vae(vae, cache_dir)
    # fp32 unless asked: training needs fp32 master weights, and transformers 5 would otherwise
    # keep a text encoder saved in fp16 in fp16.
    common = dict(**dtype_argument("diffusers", dtype or torch.float32), safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    try:
        if kind == "file":
            keys, shapes = keys_and_shapes(Path(where))
            config = skeleton_folder(sd1_variant(keys, shapes), cache_dir)
            pipe = StableDiffusionPipeline.from_single_file(where, config=str(config), local_files_only=True,
                                                            **common)
        else:
            extra = {"revision": revision} if revision else {}
            if kind == "folder":
                extra["local_files_only"] = True
                check_folder(Path(where))
            pipe = StableDiffusionPipeline.from_pretrained(where, token=os.environ.get("HF_TOKEN") or None,
                                                           **extra, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not load base model {source!r} ({kind}): {e}") from e
    _check_unet_is_sd1(pipe.unet, source)
    if vae:
        pipe.vae = load_vae(vae, revision=revision, dtype=dtype, cache_dir=cache_dir)
    return pipe


# The parts of a diffusers folder dbnb loads, each with the files it cannot do without (the
# tokenizer: the slow pair or the fast file). Without its folder diffusers does not refuse:
# a missing tokenizer/ is built from the folder's root with no vocabulary and an endless
# model_max_length (OverflowError at the first prompt); a missing unet/ says "no file named config.json".
FOLDER_PARTS = {"unet": [("config.json",)], "vae": [("config.json",)], "text_encoder": [("config.json",)],
                "scheduler": [("scheduler_config.json",)],
                "tokenizer": [("vocab.json", "merges.txt"), ("tokenizer.json",)]}


# Parts of the base model a run depends on, fingerprinted when it starts (see fingerprint).
FINGERPRINT_PARTS = ("unet", "vae", "text_encoder")
SAMPLES_PER_TENSOR = 16


def fingerprint(pipe, parts: tuple[str, ...] = FINGERPRINT_PARTS) -> dict[str, str]:
    """A content hash per part of a loaded base model, to tell on resume whether it is the model
    the run started from. Taken from the loaded fp32 weights rather than from the files, because
    the same model comes as a folder, a .safetensors, a Hub cache entry or a fresh download to
    another path (all the same weights), and a path tells nothing. Cheap: 16 evenly spaced values
    of every tensor (fine-tunes and merges change every tensor, so any change shows), with its
    shape, in the module's own order; no names, which transformers 5 changed for the text
    encoder. Values are exact (no sums), so the same model gives the same hash on any device.
    `parts`: the pipeline's parts to hash (another family's, e.g. SDXL's two text encoders)."""
    found = {}
    for part in parts:
        digest = hashlib.sha256()
        for tensor in getattr(pipe, part).parameters():
            flat = tensor.detach().reshape(-1)
            # clamped: past 2**24 values float32 rounds the last pick up to numel (CLIP's 49408 x 768
            # token embedding: 37,945,344); the others stay the picks runs recorded
            picks = torch.linspace(0, flat.numel() - 1, min(flat.numel(), SAMPLES_PER_TENSOR)).long()
            picks = picks.clamp_(max=flat.numel() - 1)
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(flat[picks].to("cpu", torch.float32).numpy().tobytes())
        found[part] = digest.hexdigest()[:16]
    return found


def check_folder(folder: Path, parts: dict = FOLDER_PARTS) -> None:
    """Every part of a diffusers folder there, and every weight file whole, so a missing part or
    a damaged file is named (diffusers' own errors name neither). `parts`: as FOLDER_PARTS, of
    another family's folder where given."""
    missing = []
    for part, choices in parts.items():
        if not (folder / part).is_dir():
            missing.append(f"{part}/")
        elif not any(all((folder / part / name).is_file() for name in names) for names in choices):
            missing.append(" or ".join(" + ".join(f"{part}/{n}" for n in names) for names in choices))
    if missing:
        raise ModelLoadError(f"{folder} is not a whole diffusers model folder: {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing. Copy the whole model folder "
                             "again (a copy or upload that stopped part-way leaves parts out), or give the "
                             "model's single .safetensors / .ckpt file instead.")
    for path in sorted(folder.glob("*/*")):
        if path.suffix in (".safetensors", ".bin"):
            weights.check(path)


def _check_unet_is_sd1(unet, source: str) -> None:
    cfg = unet.config
    if cfg.get("addition_embed_type") or cfg.get("use_linear_projection") or cfg.get("in_channels") != 4:
        raise ModelLoadError(f"{source!r} is not an SD 1.x model (SD 2.x / SDXL / inpainting UNet); the SD 1.x "
                             f"loader reads SD 1.x only. {SDXL_BY_PATH}")


def load_vae(source: str, revision: str = "", dtype=None, cache_dir: str | Path | None = None):
    """A separate VAE: a diffusers folder (with or without `vae/`), repo id or single file."""
    from diffusers import AutoencoderKL

    kind, where = resolve_source_vae(source, cache_dir)
    if kind == "file":
        weights.check(where)
        # The config must match the file's widths; SD 1.5's alone would refuse dbnb's small VAEs.
        config = skeleton_folder(vae_variant(keys_and_shapes(Path(where))[1], source), cache_dir)
    try:
        if kind == "file":
            return AutoencoderKL.from_single_file(where, config=str(config), subfolder="vae",
                                                  local_files_only=True, **dtype_argument("diffusers", dtype))
        sub = "vae" if (Path(where) / "vae").is_dir() else None
        extra = {"revision": revision} if revision else {}
        return AutoencoderKL.from_pretrained(where, subfolder=sub, **dtype_argument("diffusers", dtype), **extra)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not load VAE {source!r}: {e}") from e


def save_folder(single_file: str | Path, folder: Path, records: dict[str, dict], load=None) -> Path:
    """A single SD 1.x file → a diffusers folder to train from (or merge), always fp32 whatever
    the file's dtype: training keeps fp32 master weights, and a saved fp16 text encoder would load
    back in fp16 (transformers 5 keeps the saved dtype), which the trainer cannot train on; fp16
    values are exact in fp32. `records`: JSON files written beside the parts (file name → content).
    Written under a hidden name and renamed into place when complete; `folder` must be absent or empty.
    `load`: another family's load_pipeline (SDXL's, whose second tokenizer is saved as the first)."""
    import json

    pipe = (load or load_pipeline)(str(single_file), dtype=torch.float32)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pipe, name, None) is not None:
            save_tokenizer(getattr(pipe, name), tmp / name)
    for name, record in records.items():
        (tmp / name).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")
    if folder.exists():
        folder.rmdir()
    os.replace(tmp, folder)
    return folder
