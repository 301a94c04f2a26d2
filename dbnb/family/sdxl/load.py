"""Which sources are SDXL models, how they sample, and loading one as a StableDiffusionXLPipeline.

A diffusers folder or Hub model is SDXL when its model_index.json names StableDiffusionXLPipeline
or its UNet is conditioned on the size / crop time ids (addition_embed_type "text_time", which no
SD 1.x or 2.x UNet has); a Hub model's files are read from the Hugging Face cache, or fetched
when online. A single file is SDXL when it holds the original layout's text encoders
(`conditioner.embedders.*`); it loads offline with the SDXL config skeleton shipped in the package
(dbnb.family.sdxl.skeleton), and its v_pred / ztsnr markers set the scheduler's prediction type and
zero-terminal-SNR rescaling (dbnb.family.sdxl.layout).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dbnb.core.versions import dtype_argument
from dbnb.family.sd1.load import check_folder, load_vae
from dbnb.family.source import LOADABLE_SUFFIXES, ModelLoadError, resolve_source
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.sdxl import layout
from dbnb.family.sdxl.skeleton import sdxl_variant, skeleton_folder

PIPELINE_CLASS = "StableDiffusionXLPipeline"
TIME_IDS_EMBEDDING = "text_time"  # the UNet's addition_embed_type: its added conditioning is pooled text + time ids
SINGLE_FILE_MARK = "conditioner.embedders."  # the original layout's text encoders (SD 1.x: cond_stage_model.)
# As dbnb.family.sd1.load.FOLDER_PARTS: the parts of an SDXL folder, each with the files it cannot do without
FOLDER_PARTS = {"unet": [("config.json",)], "vae": [("config.json",)], "text_encoder": [("config.json",)],
                "text_encoder_2": [("config.json",)], "scheduler": [("scheduler_config.json",)],
                "tokenizer": [("vocab.json", "merges.txt"), ("tokenizer.json",)],
                "tokenizer_2": [("vocab.json", "merges.txt"), ("tokenizer.json",)]}
FINGERPRINT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def _json(path: Path | None) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def hub_file(repo_id: str, name: str, revision: str = "") -> Path | None:
    """One small file of a Hub model: from the Hugging Face cache, else fetched unless offline
    (HF_HUB_OFFLINE); None when neither has it (no such repo or file, no network)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache  # lazy: only for Hub ids

    cached = try_to_load_from_cache(repo_id, name, revision=revision or None)
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(hf_hub_download(repo_id, name, revision=revision or None, token=_token()))
    except Exception:  # noqa: BLE001 — not found, private, offline: not recognized here; SD 1.x's loader names why
        return None


def _local(source: str, revision: str = "") -> tuple[str, str]:
    """resolve_source's answer (a URL, a Drive link or a single-file Hub repo fetched: loading needs
    it anyway, and only its keys tell the family), or ("", source) for what it refuses (not a model)."""
    try:
        return resolve_source(source, revision=revision)
    except ModelLoadError:
        return "", str(source)


def _folder_file(kind: str, where: str, name: str, revision: str = "") -> Path | None:
    """`name` inside the diffusers folder or Hub model `where`; None for anything else."""
    if kind == "folder":
        return Path(where) / name
    return hub_file(where, name, revision) if kind == "hub" else None


def _file_keys(path: Path) -> list[str] | None:
    try:
        return keys_and_shapes(path)[0]
    except Exception:  # noqa: BLE001 — a damaged file is not recognized here; SD 1.x's loader names the damage
        return None


def is_sdxl(source: str, revision: str = "") -> bool:
    """Whether `source` is an SDXL model: a diffusers folder, a Hub id (its model_index.json and UNet
    config, from the cache when offline) or a single file, local, at a URL or alone in a Hub repo
    (its keys; a .safetensors from its header)."""
    kind, where = _local(source, revision)
    if kind == "file":
        path = Path(where)
        keys = _file_keys(path) if path.suffix.lower() in LOADABLE_SUFFIXES else None
        return bool(keys) and any(k.startswith(SINGLE_FILE_MARK) for k in keys)
    index = _folder_file(kind, where, "model_index.json", revision)
    if index is None or not index.is_file():
        return False
    if _json(index).get("_class_name") == PIPELINE_CLASS:
        return True
    return _json(_folder_file(kind, where, "unet/config.json", revision)).get("addition_embed_type") == TIME_IDS_EMBEDDING


def sampling_of(source: str, revision: str = "") -> tuple[str, bool]:
    """(prediction_type, rescale_betas_zero_snr) of the SDXL model at `source`: a single file's markers,
    a folder's or Hub model's scheduler config; SDXL's own (layout.EPSILON) where none says, or none is given."""
    if not source:
        return layout.EPSILON
    kind, where = _local(source, revision)
    if kind == "file":
        return layout.sampling(_file_keys(Path(where)) or [])
    scheduler = _json(_folder_file(kind, where, SCHEDULER_CONFIG, revision))
    if scheduler.get("prediction_type") != "v_prediction":
        return layout.EPSILON
    return "v_prediction", bool(scheduler.get("rescale_betas_zero_snr", False))


def scheduler_for(folder: Path, prediction: tuple[str, bool]):
    """The skeleton's scheduler, sampling as `prediction` ((prediction_type, zero_snr)) says; a
    zero-terminal-SNR schedule steps from the last timestep ("trailing"), or it never starts from pure noise."""
    from diffusers import EulerDiscreteScheduler

    prediction_type, zero_snr = prediction
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {}
    return EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler", prediction_type=prediction_type,
                                                  **extra)


def fetch_hub(repo_id: str, revision: str = "") -> Path:
    """A Hub SDXL model's diffusers folder in the Hugging Face cache (only the pipeline's files: no
    single-file copies, no fp16 duplicates), fetched once; offline, the cached one."""
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import constants

    extra = {"revision": revision} if revision else {}
    try:
        return Path(StableDiffusionXLPipeline.download(repo_id, cache_dir=constants.HF_HUB_CACHE, token=_token(),
                                                       local_files_only=constants.HF_HUB_OFFLINE, **extra))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not fetch SDXL model {repo_id!r} from the Hugging Face Hub: {e}. Check the "
                             "repo id and your network (HF_TOKEN for a gated or private model), or set "
                             "pretrained_model_name_or_path to a local folder or .safetensors file.") from e


def from_single_file(path: Path, keys: list[str], shapes: dict, dtype: torch.dtype):
    """diffusers' reading of an SDXL single file (its `keys` and `shapes`), offline: the shipped
    skeleton of its widths, the scheduler its markers say."""
    from diffusers import StableDiffusionXLPipeline

    config = skeleton_folder(sdxl_variant(shapes, str(path)))
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, add_watermarker=False,
        scheduler=scheduler_for(config, layout.sampling(keys)), **dtype_argument("diffusers", dtype))


def read_part(folder: Path, part: str, dtype: torch.dtype):
    """The model `part` (unet, vae, text_encoder, text_encoder_2) of the SDXL folder, read in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    library, kind = {"unet": ("diffusers", UNet2DConditionModel), "vae": ("diffusers", AutoencoderKL),
                     "text_encoder": ("transformers", CLIPTextModel),
                     "text_encoder_2": ("transformers", CLIPTextModelWithProjection)}[part]
    return kind.from_pretrained(folder, subfolder=part, local_files_only=True, **dtype_argument(library, dtype))


def load_pipeline(source: str, vae: str = "", revision: str = "", dtype=None):
    """A `StableDiffusionXLPipeline` from an SDXL diffusers folder, Hub id or single file, in fp32
    unless `dtype`: one, or one per part by name with a "default", with the VAE at `vae` in place of
    its own when given (an fp16-fix VAE: the same latent space)."""
    from diffusers import StableDiffusionXLPipeline

    kind, where = resolve_source(source, revision=revision)
    dtypes = dtype if isinstance(dtype, dict) else {"default": dtype or torch.float32}
    default = dtypes["default"]
    apart = {part: part_dtype for part, part_dtype in dtypes.items() if part != "default" and part_dtype != default}
    try:
        if kind == "file":  # diffusers reads a single file in one dtype: the parts named apart are cast after
            pipe = from_single_file(Path(where), *keys_and_shapes(Path(where)), default)
            for part, part_dtype in apart.items():
                getattr(pipe, part).to(part_dtype)
        else:
            folder = fetch_hub(where, revision) if kind == "hub" else Path(where)
            check_folder(folder, FOLDER_PARTS)
            # Each part named apart is read in its own dtype and handed in: a dict of dtypes is not
            # taken by the oldest diffusers / transformers dbnb supports.
            pipe = StableDiffusionXLPipeline.from_pretrained(
                folder, local_files_only=True, add_watermarker=False, **dtype_argument("diffusers", default),
                **{part: read_part(folder, part, part_dtype) for part, part_dtype in apart.items()})
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"Could not load SDXL base model {source!r} ({kind}): {e}") from e
    if vae:
        scaling = pipe.vae.config.scaling_factor
        pipe.vae = load_vae(vae, revision=revision, dtype=dtypes.get("vae", default))
        # a VAE file is read with SD 1.5's config (0.18215); an SDXL VAE keeps the base's latent scale
        pipe.vae.register_to_config(scaling_factor=scaling)
    return pipe
