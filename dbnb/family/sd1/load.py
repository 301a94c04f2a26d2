"""Load an SD 1.x base model from wherever users keep one.

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
import urllib.parse
from pathlib import Path

import torch

from dbnb.core import download as downloads
from dbnb.core import weights
from dbnb.core.errors import DbnbError
from dbnb.core.platform import default_cache_dir
from dbnb.core.source_names import HUB_FILE_URL, HUB_ID
from dbnb.core.versions import dtype_argument
from dbnb.core.weights import UnsafeCheckpointError, WeightFileError, read_state_dict  # noqa: F401 (re-exported)
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.sd1.skeleton import SKELETON, VARIANTS, config_folder, save_tokenizer, skeleton_config

# A single-file model dbnb loads (dbnb.core.weights reads them all); what it writes: dbnb.family.sd1.layout.WRITTEN_SUFFIXES
LOADABLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VAE_SETTING = "pretrained_vae_name_or_path"
# What to do with an SDXL model the SD 1.x loader was given: dbnb.family.sdxl recognizes folders, files, URLs and
# Hub ids it can read, so this one came by another way (a Hub model the Hub did not show, offline and not cached)
SDXL_BY_PATH = ("Set pretrained_model_name_or_path to the SDXL model's .safetensors file or diffusers folder (or its "
                "URL), which dbnb reads as SDXL; a Hub id offline needs the model in the Hugging Face cache.")


class ModelLoadError(DbnbError, RuntimeError):
    """The base model could not be loaded; the message says which source and what to do."""




# --- where the model is ------------------------------------------------------------------

def resolve_source(source: str, cache_dir: str | Path | None = None, what: str = "Base model",
                   setting: str = "pretrained_model_name_or_path", revision: str = "") -> tuple[str, str]:
    """Classify `source` and fetch it if remote. Returns (kind, location) with kind one of
    "folder", "file" or "hub" (a diffusers model on the Hub; a Hub repo of one weight file is
    fetched and is a "file"). `what` and `setting` name it in messages (the VAE has its own)."""
    source = str(source).strip()
    if not source:
        raise ModelLoadError(f"No {what.lower()} given: set {setting}.")
    remote = source.startswith(("http://", "https://"))
    path = fetched(source, cache_dir, setting) if remote else Path(source).expanduser()
    named = f"{source} (downloaded to {path})" if remote else str(path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{setting} {named} is a folder but has no model_index.json, so it is not a "
                                 "diffusers model folder. Point to the folder that holds model_index.json, or to a "
                                 ".safetensors / .ckpt file.")
        return "folder", str(path)
    if path.is_file():
        if path.suffix.lower() == ".zip":
            inside = ("the VAE folder (config.json)" if setting == VAE_SETTING
                      else "the folder that holds model_index.json")
            raise ModelLoadError(f"{setting} {named} is a .zip: unzip it, then set {setting} to {inside} or to "
                                 "the .safetensors / .ckpt file inside.")
        if path.suffix.lower() not in LOADABLE_SUFFIXES:
            raise ModelLoadError(f"{setting} {named}: unknown model file type {path.suffix!r}; expected one of "
                                 f"{', '.join(LOADABLE_SUFFIXES)}.")
        return "file", str(path)
    if looks_like_path(source):
        # Said before the Hub is asked: 'models/my.safetensors' also fits a repo id's pattern, and
        # the Hub's answer for it ("not fully cached") hides that the file is simply not there.
        raise ModelLoadError(f"{what} {source!r} does not exist: no file or folder at {path.absolute()}. "
                             "A relative path is read from the folder dbnb runs in "
                             f"({Path.cwd()}); set {setting} to the full path of the file or folder "
                             "(on Colab: is Drive mounted? /content/drive/MyDrive/...).")
    if HUB_ID.match(source):
        single = hub_weight_file(source, revision, cache_dir, setting)
        return ("file", str(single)) if single else ("hub", source)
    raise ModelLoadError(f"{what} {source!r} is neither an existing folder or file, a URL, nor a "
                         f"Hugging Face repo id like 'org/name'. Check {setting} (on Colab: is Drive mounted?).")


def hub_weight_file(repo_id: str, revision: str = "", cache_dir: str | Path | None = None,
                    setting: str = "pretrained_model_name_or_path") -> Path | None:
    """The one weight file of a Hub repo that holds a model as a single file instead of a diffusers
    model (Illustrious-XL 0.1, Pony V6), fetched once (into `cache_dir`/hub, else the Hugging Face
    cache); None for a diffusers model (model_index.json) or a repo the Hub or, offline, the cache
    does not show, which diffusers' loading then names. Several weight files: which one to set, by URL."""
    from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache

    hub_cache = str(Path(cache_dir) / "hub") if cache_dir else None
    rev = revision or None
    if isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache, revision=rev), str):
        return None  # a diffusers model fetched before: no need to ask the Hub
    offline = constants.HF_HUB_OFFLINE
    try:
        if offline:
            snapshot = Path(snapshot_download(repo_id, revision=rev, cache_dir=hub_cache, local_files_only=True))
            names = [p.name for p in snapshot.iterdir()]
        else:
            names = HfApi().list_repo_files(repo_id, revision=rev, token=os.environ.get("HF_TOKEN") or None)
    except Exception:  # noqa: BLE001 — no such repo, private, no network: diffusers' own loading says which
        return None
    if "model_index.json" in names:
        return None
    weights = sorted(n for n in names if "/" not in n and Path(n).suffix.lower() in LOADABLE_SUFFIXES)
    weights = [n for n in weights if n.endswith(".safetensors")] or weights  # a .ckpt beside it: the same model
    if not weights:
        return None
    if len(weights) > 1:
        urls = "\n".join(f"  https://huggingface.co/{repo_id}/resolve/{revision or 'main'}/{n}" for n in weights)
        raise ModelLoadError(f"{setting} {repo_id!r}: this Hub repo holds no diffusers model (model_index.json) but "
                             f"{len(weights)} model files. Set {setting} to the one to train from, by its URL:\n{urls}")
    return hub_download(repo_id, weights[0], revision, cache_dir, what=f"{setting} {repo_id!r}")


def hub_download(repo_id: str, name: str, revision: str = "", cache_dir: str | Path | None = None,
                 what: str = "") -> Path:
    """One file of a Hub repo, fetched once into `cache_dir`/hub (else the Hugging Face cache),
    where the repo's folder names it (dbnb.core.source_names.hub_repo); offline, the cached one."""
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, name, revision=revision or None,
                                    cache_dir=str(Path(cache_dir) / "hub") if cache_dir else None,
                                    local_files_only=constants.HF_HUB_OFFLINE,
                                    token=os.environ.get("HF_TOKEN") or None))
    except Exception as e:  # noqa: BLE001 — network, disk, a file only partly cached: said with the file
        raise ModelLoadError(f"{what or repo_id}: could not fetch {name} from the Hugging Face Hub ({repo_id}): {e}. "
                             "Check your network (HF_TOKEN for a gated model) and the free disk space, then run "
                             "again.") from e


def fetched(url: str, cache_dir, setting: str) -> Path:
    """download(), its failure named with the setting that gave the URL."""
    try:
        return download(url, cache_dir)
    except ModelLoadError as e:
        raise ModelLoadError(f"{setting}: {e}") from None


def looks_like_path(source: str) -> bool:
    """Whether `source` can only be a path, never a Hub id ('org/name'): a weight file's suffix,
    a start that only paths have, a backslash, or more than one slash."""
    return (Path(source).suffix.lower() in LOADABLE_SUFFIXES or source.startswith(("./", "../", "/", "~"))
            or "\\" in source or source.count("/") > 1)


def download(url: str, cache_dir: str | Path | None = None) -> Path:
    """Fetch a URL into the cache, once: a file, or a folder for a Drive folder link (a diffusers
    model or VAE folder shared on Drive)."""
    if found := HUB_FILE_URL.match(url.split("?")[0]):
        # the Hub's own download: its cache (the repo named in the path, for the model card), resume, token
        return hub_download(found[1], urllib.parse.unquote(found[3]), found[2], cache_dir, what=url)
    cache = Path(cache_dir or default_cache_dir()) / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    done = [p for p in cache.glob(f"{key}-*") if not p.name.endswith(".part")]
    if done:
        return done[0]
    if downloads.is_drive(url):
        tmp = cache / f"{key}.part"
        shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted download left
        tmp.mkdir()
        try:
            got = downloads.fetch_drive(url, tmp)
        except downloads.FetchError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(str(e)) from None
        if got == tmp:
            final = cache / f"{key}-drive-folder"
        else:
            # Drive's name as gdown was given it; a name without a model suffix gets the one its
            # first bytes tell, so the suffix check reads the truth.
            name = got.name if got.suffix.lower() in LOADABLE_SUFFIXES else got.name + _sniff_suffix(got)
            final = cache / f"{key}-{name}"
            os.replace(got, final)
            tmp.rmdir()
            return final
    else:
        name = Path(urllib.parse.urlparse(url).path).name or "model.safetensors"
        final = cache / f"{key}-{name}"
        tmp = cache / f"{final.name}.part"
        try:
            downloads.download(url, tmp, progress=True)
        except downloads.FetchError as e:
            raise ModelLoadError(str(e)) from None
    os.replace(tmp, final)
    return final


def _sniff_suffix(path: Path) -> str:
    head = path.read_bytes()[:8] if path.stat().st_size >= 8 else b""
    return ".ckpt" if head[:2] == b"PK" or head[:1] == b"\x80" else ".safetensors"


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


def resolve_source_vae(source: str, cache_dir) -> tuple[str, str]:
    source = str(source).strip()
    remote = source.startswith(("http://", "https://"))
    path = fetched(source, cache_dir, VAE_SETTING) if remote else Path(source).expanduser()
    if path.is_dir():  # a bare VAE folder has config.json, not model_index.json
        if not any((path / sub / "config.json").is_file() for sub in ("", "vae")):
            raise ModelLoadError(f"{VAE_SETTING} {source!r} is a folder without config.json (nor vae/config.json), so "
                                 "it is not a VAE. Set it to a VAE folder (config.json + the weights), a model folder "
                                 "with vae/, a VAE .safetensors file, or '' for the base model's own VAE.")
        return "folder", str(path)
    return resolve_source(str(path) if remote else source, cache_dir, what="VAE", setting=VAE_SETTING)


def fetch_model(source: str, cache_dir: str | Path | None = None, revision: str = "") -> str:
    """Bring a base model to local disk once (into `cache_dir`, e.g. on Drive) and return a
    local path that `load_pipeline` reads without downloading again."""
    kind, where = resolve_source(source, cache_dir, revision=revision)
    if kind != "hub":
        return where
    from diffusers import DiffusionPipeline

    # Only the files the pipeline needs (not the repo's 4-7 GB .ckpt / .safetensors copies, nor the
    # safety checker that load_pipeline never loads). DiffusionPipeline: the repo's model_index.json
    # names the pipeline and its parts, so an SDXL repo brings both text encoders (issue 33).
    extra = {"revision": revision} if revision else {}
    folder = DiffusionPipeline.download(where, cache_dir=str(Path(cache_dir or default_cache_dir()) / "hub"),
                                              token=os.environ.get("HF_TOKEN") or None, safety_checker=None,
                                              feature_extractor=None, **extra)
    return str(folder)


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
