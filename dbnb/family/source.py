"""Where a base model is, for every family: a diffusers folder, a Hugging Face repo id (a
diffusers model, or a repo of one single file), a single `.safetensors` / `.ckpt`, an `https://`
URL or a Google Drive link, told apart and brought to local disk once. Which family the model
is, and how it loads, is the families' (dbnb.family.sd1.load, dbnb.family.sdxl.load)."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import urllib.parse
from pathlib import Path

from dbnb.core import download as downloads
from dbnb.core.errors import DbnbError
from dbnb.core.platform import default_cache_dir
from dbnb.core.source_names import HUB_FILE_URL, HUB_ID

# A single-file model dbnb loads (dbnb.core.weights reads them all); what it writes: dbnb.family.sd1.layout.WRITTEN_SUFFIXES
LOADABLE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
VAE_SETTING = "pretrained_vae_name_or_path"
# A diffusers model's folder (model_index.json) or one part of one (config.json: a VAE such as sdxl-vae-fp16-fix,
# whose repo also holds single files): a Hub repo holding one is diffusers', never read as single files
DIFFUSERS_MARKS = {"model_index.json", "config.json"}


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
    cache); None for a diffusers model or part (model_index.json, a VAE's config.json) or a repo neither
    the Hub nor the cache shows, which diffusers' loading then names. Several weight files: which one
    to set, by URL."""
    from huggingface_hub import try_to_load_from_cache

    hub_cache = str(Path(cache_dir) / "hub") if cache_dir else None
    if isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=hub_cache, revision=revision or None),
                  str):
        return None  # a diffusers model fetched before: no need to ask the Hub
    names = _repo_files(repo_id, revision, hub_cache, *_hub_state())
    if names is None or DIFFUSERS_MARKS & set(names):
        return None
    weights = sorted(n for n in names if "/" not in n and Path(n).suffix.lower() in LOADABLE_SUFFIXES)
    weights = [n for n in weights if n.endswith(".safetensors")] or weights  # a .ckpt beside it: the same model
    if not weights:
        return None
    if len(weights) > 1:
        rev = urllib.parse.quote(revision or "main", safe="")
        urls = "\n".join(f"  https://huggingface.co/{repo_id}/resolve/{rev}/{n}" for n in weights)
        raise ModelLoadError(f"{setting} {repo_id!r}: this Hub repo holds no diffusers model (model_index.json) but "
                             f"{len(weights)} model files. Set {setting} to the one to train from, by its URL:\n{urls}")
    return hub_download(repo_id, weights[0], revision, cache_dir, what=f"{setting} {repo_id!r}")


def _hub_state() -> tuple[bool, str]:
    """(offline, the Hugging Face cache): what a remembered answer about the Hub depends on."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE), str(constants.HF_HUB_CACHE)


@functools.lru_cache(maxsize=64)
def _repo_files(repo_id: str, revision: str, hub_cache: str | None, offline: bool, _hf_cache: str) -> tuple | None:
    """The files of a Hub repo, asked once a process (the family is told from the model many times a run):
    the Hub's listing, else (offline, or the Hub not reached) the cached snapshot's; None when neither has it."""
    from huggingface_hub import HfApi, snapshot_download

    if not offline:
        try:
            return tuple(HfApi().list_repo_files(repo_id, revision=revision or None))  # HF_TOKEN: the Hub's own
        except Exception:  # noqa: BLE001 — no such repo, private, no network: the cache may still have it
            pass
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision or None, cache_dir=hub_cache,
                                          local_files_only=True))
        return tuple(p.name for p in snapshot.iterdir())
    except Exception:  # noqa: BLE001 — not cached either: diffusers' own loading says why
        return None


def hub_download(repo_id: str, name: str, revision: str = "", cache_dir: str | Path | None = None,
                 what: str = "") -> Path:
    """One file of a Hub repo, fetched once into `cache_dir`/hub (else the Hugging Face cache),
    where the repo's folder names it (dbnb.core.source_names.hub_repo); offline, the cached one."""
    try:
        return _hub_file(repo_id, name, revision, str(Path(cache_dir) / "hub") if cache_dir else None, *_hub_state())
    except Exception as e:  # noqa: BLE001 — network, disk, a file only partly cached: said with the file
        raise ModelLoadError(f"{what or repo_id}: could not fetch {name} from the Hugging Face Hub ({repo_id}): {e}. "
                             "Check your network (HF_TOKEN for a gated model) and the free disk space, then run "
                             "again.") from e


@functools.lru_cache(maxsize=64)
def _hub_file(repo_id: str, name: str, revision: str, hub_cache: str | None, offline: bool, _hf_cache: str) -> Path:
    """hf_hub_download once a process: each call asks the Hub whether the file changed."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, name, revision=revision or None, cache_dir=hub_cache,
                                local_files_only=offline))


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
        return hub_download(found[1], urllib.parse.unquote(found[3]), urllib.parse.unquote(found[2]), cache_dir,
                            what=url)
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
