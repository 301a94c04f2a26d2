"""Base-model merging, as AUTOMATIC1111's Checkpoint Merger does it, without installing the webui.

The two recipes that training reports start from:

    weighted sum     "NAI 5, any 2.7, gape 2, SD1.4 0.3"   Σ wᵢ·modelᵢ, weights normalised to sum 1
                                                           by default (normalize=False: as given)
    add difference   "Any + (NAI nsfw − NAI sfw) × 0.4"    A + (B − C)·α

Merging is done in the original (single-file, LDM) layout, as the webui does, so a diffusers
folder input is mapped to that layout key by key (dbnb.layout's maps). Arithmetic is in fp32;
the result is cast to the output dtype. The first input is the *primary*: the result has its
key set, and whatever is not merged comes from it.

Memory: inputs are read one tensor at a time (safetensors through `safe_open`, `.ckpt` through
dbnb's safe loader with mmap, both reopened every 128 MiB so touched pages do not pile up), and
only the result is kept, in the output dtype, until it is written: a four-way SD 1.5 merge
peaks at 2.8 GiB RSS with fp16 output, 4.6 GiB with fp32 (bench/bench_merge.py).
The same merge of the same files gives the same .safetensors bytes, hence the same hash.

Inputs whose key sets differ are handled by these rules, printed when they apply:

    model_ema.*                        dropped (the EMA copy; the webui and training use the normal weights)
    cond_stage_model.transformer.X     old text-encoder prefix: renamed to ...transformer.text_model.X
    ...embeddings.position_ids         never averaged: if the primary has it, the result has the exact
                                       int64 0..n-1 (merges that averaged it left floats like 75.9999)
    non-model keys (alphas_cumprod,    copied from the primary unchanged (not learnt; other inputs'
      betas, logvar, …)                copies are ignored)
    a merged component missing or      error naming the inputs (a different architecture); a missing
      with other keys / shapes         VAE / text encoder can be taken from the primary instead
                                       (include_vae=False / include_text_encoder=False)
    a component not merged             copied from the primary (unet_only, include_vae=False, …)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import urllib.parse
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from dbnb.errors import DbnbError
from dbnb import __version__
from dbnb.layout import (ORIGINAL_PREFIXES, remove_leftovers, text_encoder_key_map, unet_key_map, vae_key_map,
                         vae_tensor, write_single_file)
from dbnb import weights
from dbnb.models import ModelLoadError, load_checkpoint_file, resolve_source, sd1_variant

MODES = ("weighted_sum", "add_difference")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
COMPONENTS = ("unet", "vae", "text_encoder")
EMA_PREFIX = "model_ema."
TE_OLD, TE_NEW = "cond_stage_model.transformer.", ORIGINAL_PREFIXES["text_encoder"]
POSITION_IDS = TE_NEW + "embeddings.position_ids"
# Weight files of a diffusers folder, in order of preference (plain, sharded, fp16 variant, pickle).
_FOLDER_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model-*-of-*.safetensors", "model.fp16.safetensors",
                     "pytorch_model.bin"),
}
_FOLDER_FILES["vae"] = _FOLDER_FILES["unet"]
_FOLDER_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}

Entry = tuple[Callable[[], torch.Tensor], tuple[int, ...]]  # (read the tensor, its shape)
REOPEN_BYTES = 1 << 27  # per input: 4 inputs keep at most ~0.5 GiB of input pages resident


class MergeError(DbnbError, ValueError):
    """The merge cannot be made as asked; the message names the inputs and what to do."""


@dataclass(frozen=True)
class MergeResult:
    file: Path | None       # the single file (original layout), if one was asked for
    folder: Path | None     # the diffusers folder, if one was asked for
    name: str
    recipe: str
    short_hash: str         # A1111 short hash of `file` (of the folder's weight files without one)
    inputs: list[dict]      # label, source, sha256, short_hash, legacy_hash per input
    notes: list[str]        # the key-set rules that applied
    seconds: float


@dataclass
class _Input:
    label: str
    source: str
    path: Path                  # the file or folder read
    entries: dict[str, Entry]   # original-layout key → tensor, after the key rules
    files: list[Path]           # what its hash covers
    notes: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""


# --- hashes --------------------------------------------------------------------------------------

def _weight_files(path: Path) -> list[Path]:
    if path.is_dir():
        return [f for component in COMPONENTS for f in _component_files(path, component)]
    return [path]


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a model file (the webui's hash); of a diffusers folder, of its UNet, VAE and
    text-encoder weight files read in that order (not a webui hash: the webui has no folders)."""
    digest = hashlib.sha256()
    for file in _weight_files(Path(path)):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256_of(path)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """The webui's pre-2023 8-hex "model hash" (64 KiB at 1 MiB), which older reports cite."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --- names and weights ---------------------------------------------------------------------------

def default_label(source: str) -> str:
    """A short name for an input: the file or folder stem, the repo name, the Drive file id."""
    text = str(source).rstrip("/")
    if "drive.google.com" in text or "docs.google.com" in text:
        found = re.search(r"(?:/d/|[?&]id=)([\w-]+)", text)
        return f"drive-{found.group(1)[:10]}" if found else "drive"
    if text.startswith(("http://", "https://")):
        text = urllib.parse.urlparse(text).path.rstrip("/")
    return Path(text).stem or str(source)


def coefficients(n: int, weights: Sequence[float] | None = None, *, mode: str = "weighted_sum",
                 alpha: float = 0.5, normalize: bool = True, labels: Sequence[str] | None = None) -> list[float]:
    """What each input is multiplied by: the (normalised) weights, or [1, α, −α] for A + (B − C)·α."""
    labels = list(labels or [f"model {i + 1}" for i in range(n)])
    if mode not in MODES:
        raise MergeError(f"merge mode {mode!r}: choose weighted_sum or add_difference.")
    if mode == "add_difference":
        if n != 3:
            raise MergeError(f"add difference is A + (B − C) × alpha and takes exactly three models; got {n} "
                             f"({', '.join(labels)}).")
        if weights is not None:
            raise MergeError("add difference takes alpha, not weights: drop the weights.")
        if not math.isfinite(alpha):
            raise MergeError(f"alpha must be a number, got {alpha!r}.")
        return [1.0, float(alpha), -float(alpha)]
    if n < 2:
        raise MergeError(f"a weighted sum needs at least two models; got {n}.")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"{len(weights)} weights for {n} models ({', '.join(labels)}): give one weight per "
                         "model, in the same order.")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be numbers, got {weights}.")
    if not normalize:
        return weights
    total = sum(weights)
    if abs(total) < 1e-12:
        raise MergeError(f"weights {weights} sum to 0, so they cannot be normalised; use normalize=False "
                         "(CLI: --as-given) to apply them as given.")
    return [w / total for w in weights]


def recipe(labels: Sequence[str], weights: Sequence[float] | None = None, *, mode: str = "weighted_sum",
           alpha: float = 0.5, normalize: bool = True) -> str:
    """The recipe as training reports write it: "NAI 5, any 2.7, gape 2, SD1.4 0.3" or
    "Any + (NAI nsfw − NAI sfw) × 0.4". Weights are the ones given (the reports' relative form)."""
    if mode == "add_difference":
        a, b, c = labels
        return f"{a} + ({b} − {c}) × {alpha:g}"
    weights = [1.0] * len(labels) if weights is None else list(weights)
    text = ", ".join(f"{label} {w:g}" for label, w in zip(labels, weights))
    if not normalize and abs(sum(weights) - 1) > 1e-9:
        text += " (weights as given, not normalised)"
    return text


def file_stem(name: str) -> str:
    """A file name for a recipe: "Any + (NAI nsfw − NAI sfw) × 0.4" → "Any+(NAI_nsfw-NAI_sfw)x0.4"."""
    text = name.replace(" × ", "x").replace(" − ", "-").replace(" + ", "+").replace("×", "x").replace("−", "-")
    text = re.sub(r"[^\w.+()-]+", "_", text).strip("_.")
    return text[:120] or "merged"


# --- reading inputs ------------------------------------------------------------------------------

class _Reader:
    """One weight file, read a tensor at a time. Both loaders map the file, and every page a
    tensor touched stays in the process's RSS while the mapping is open (16 GiB for four SD 1.5
    inputs), so the file is reopened after each REOPEN_BYTES read. A tensor already returned
    keeps its own pages valid until it is dropped."""

    def __init__(self, path: Path):
        weights.check(path)  # a damaged or non-weight file is named here, before any work
        self.path, self.since, self._handle = path, 0, None
        self.safetensors = path.suffix.lower() == ".safetensors"
        # A legacy (non-zip) .ckpt cannot be mapped, only read whole: reopening would re-read it.
        self.reopen = self.safetensors or zipfile.is_zipfile(path)
        opened = self._open()
        if self.safetensors:
            self.metadata = dict(opened.metadata() or {})
            self.shapes = {k: tuple(opened.get_slice(k).get_shape()) for k in opened.keys()}
        else:
            self.metadata, self.shapes = {}, {k: tuple(t.shape) for k, t in opened.items()}

    def _open(self):
        if self.safetensors:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), "pt")
            self._get = self._handle.get_tensor
            return self._handle
        state = load_checkpoint_file(self.path)  # refuses pickles that would run code
        self._get = state.__getitem__
        return state

    def get(self, key: str) -> torch.Tensor:
        if self._get is None:
            self._open()
        tensor = self._get(key)
        self.since += tensor.numel() * tensor.element_size()
        if self.reopen and self.since >= REOPEN_BYTES:
            self.close()
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = self._get = None
        self.since = 0


def _file_entries(path: Path, stack: ExitStack) -> tuple[dict[str, Entry], dict[str, str]]:
    """Every tensor of one weight file, unread, and its metadata. safetensors go through
    `safe_open`, anything else through dbnb's safe loader (weights_only, mmap)."""
    reader = _Reader(path)
    stack.callback(reader.close)
    return {k: (partial(reader.get, k), shape) for k, shape in reader.shapes.items()}, reader.metadata


def _component_files(folder: Path, component: str) -> list[Path]:
    for pattern in _FOLDER_FILES[component]:
        found = sorted((folder / component).glob(pattern))
        if found:
            return found
    raise MergeError(f"{folder} has no {component} weights ({folder / component / _FOLDER_FILES[component][0]}): "
                     "is the folder complete?")


def _folder_entries(folder: Path, stack: ExitStack) -> dict[str, Entry]:
    """A diffusers folder seen in the original layout, still unread."""
    out: dict[str, Entry] = {}
    for component in COMPONENTS:
        raw: dict[str, Entry] = {}
        for file in _component_files(folder, component):
            raw |= _file_entries(file, stack)[0]
        try:
            key_map = _FOLDER_MAPS[component](raw)
        except ValueError as e:
            raise MergeError(f"{folder}: {component} is not an SD 1.x {component} ({e}).") from None
        for src, dst in key_map.items():
            read, shape = raw[src]
            if component == "vae":  # the mid attention is Linear in diffusers, a 1x1 conv in the file
                shape = tuple(vae_tensor(dst, torch.empty(shape, device="meta")).shape)
                read = partial(lambda r, key: vae_tensor(key, r()), read, dst)
            out[dst] = (read, shape)
    return out


def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    wanted = ["model_index.json", "*/config.json", "unet/diffusion_pytorch_model*.safetensors*",
              "vae/diffusion_pytorch_model*.safetensors*", "text_encoder/model*.safetensors*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=wanted, ignore_patterns=["*non_ema*", "*.fp16.*"],
                                      token=os.environ.get("HF_TOKEN") or None))
    except Exception as e:  # noqa: BLE001 — offline, private, missing: the message says which
        raise MergeError(f"Could not fetch {repo_id!r} from the Hugging Face Hub ({e}). Check the id, "
                         "set HF_TOKEN for a private repo, or download the model and give its path.") from None


def _normalise(raw: dict[str, Entry], label: str) -> tuple[dict[str, Entry], list[str]]:
    """Apply the key rules that make files from different tools comparable."""
    out: dict[str, Entry] = {}
    ema = renamed = 0
    for key, entry in raw.items():
        if key.startswith(EMA_PREFIX):
            ema += 1
            continue
        if key.startswith(TE_OLD) and not key.startswith(TE_NEW):
            key, renamed = TE_NEW + key[len(TE_OLD):], renamed + 1
        if key in out:
            raise MergeError(f"{label} holds {key!r} both with and without the 'text_model.' prefix; which "
                             "one a loader uses is undefined, so dbnb does not guess. Re-save it with one.")
        out[key] = entry
    notes = []
    if ema:
        notes.append(f"{label}: dropped {ema} model_ema.* keys (the EMA copy; the webui and training use "
                     "the normal weights)")
    if renamed:
        notes.append(f"{label}: renamed {renamed} text-encoder keys from the old prefix {TE_OLD}* to {TE_NEW}*")
    return out, notes


def _open_input(source: str, label: str, stack: ExitStack, cache_dir) -> _Input:
    try:
        kind, where = resolve_source(source, cache_dir)  # URLs and Drive links land in the cache
    except ModelLoadError as e:
        raise MergeError(f"input {label!r}: {e}") from None
    path = _hub_folder(where) if kind == "hub" else Path(where)
    if path.is_dir():
        raw, metadata = _folder_entries(path, stack), {}
        info = path / "dbnb_merge.json"  # a folder dbnb merged: keep its recipe for nesting
        if info.is_file():
            metadata = {"dbnb_merge_recipe": json.loads(info.read_text(encoding="utf-8")).get("recipe", "")}
    else:
        raw, metadata = _file_entries(path, stack)
    entries, notes = _normalise(raw, label)
    return _Input(label, source, path, entries, _weight_files(path), notes, metadata)


# --- checks --------------------------------------------------------------------------------------

def _component(key: str) -> str | None:
    """unet / vae / text_encoder, or None for keys outside the three models (ldm's buffers)."""
    for component, prefix in (("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                              ("text_encoder", "cond_stage_model.")):
        if key.startswith(prefix):
            return component
    return None


def _shapes(model: _Input, component: str) -> dict[str, tuple]:
    return {k: shape for k, (_, shape) in model.entries.items()
            if k != POSITION_IDS and _component(k) == component}


def _check(models: list[_Input], merged: set[str]) -> None:
    """SD 1.x, one architecture, a complete primary: before minutes of reading, not after."""
    variants = {}
    for m in models:
        try:
            variants[m.label] = sd1_variant(m.entries, {k: s for k, (_, s) in m.entries.items()})
        except ModelLoadError as e:
            raise MergeError(f"{m.label} ({m.source}): {e}") from None
    if len(set(variants.values())) > 1:
        raise MergeError("the inputs are different architectures (" + ", ".join(
            f"{k}: {'SD 1.x' if v == 'sd15' else v}" for k, v in variants.items()) + "); merge models of one kind.")
    primary = models[0]
    for component in COMPONENTS:
        if not _shapes(primary, component):
            raise MergeError(f"{primary.label} has no {component} ({ORIGINAL_PREFIXES[component]}*). The first "
                             "model is the base of the result and must be complete: put a complete model first.")
    for component in sorted(merged):
        want = _shapes(primary, component)
        for m in models[1:]:
            got = _shapes(m, component)
            if not got:
                raise MergeError(f"{m.label} has no {component}, so its {component} cannot be merged. Merge with "
                                 f"include_{component}=False to take the {component} from {primary.label}.")
            if got.keys() != want.keys():
                diff = sorted(got.keys() ^ want.keys())
                raise MergeError(f"{primary.label} and {m.label} are different architectures: their {component} "
                                 f"keys differ ({len(diff)}, e.g. {diff[0]!r}). Only SD 1.x models of one "
                                 "architecture merge.")
            bad = next((k for k in want if want[k] != got[k]), None)
            if bad:
                raise MergeError(f"{primary.label} and {m.label} are different architectures: {bad} is "
                                 f"{list(want[bad])} in one and {list(got[bad])} in the other (an inpainting "
                                 "model with a normal one?). Only SD 1.x models of one architecture merge.")


def _rule_notes(models: list[_Input], merged: set[str]) -> list[str]:
    primary, notes = models[0], [n for m in models for n in m.notes]
    for component in COMPONENTS:
        if component not in merged:
            notes.append(f"{component}: copied from {primary.label}, not merged")
    extras = [k for k in primary.entries if _component(k) is None]
    if extras:
        notes.append(f"{len(extras)} non-model keys ({', '.join(extras[:3])}{', …' if len(extras) > 3 else ''}) "
                     f"copied from {primary.label} unchanged, not merged")
    ignored = sum(k not in primary.entries for m in models[1:] for k in m.entries)
    if ignored:
        notes.append(f"{ignored} keys that only other inputs hold (buffers, position_ids) ignored")
    if POSITION_IDS in primary.entries:
        ids = primary.entries[POSITION_IDS][0]()
        exact = torch.arange(ids.shape[-1]).reshape(ids.shape)
        broken = ids.dtype != torch.int64 or not torch.equal(ids, exact)
        notes.append(f"position_ids: not averaged; written as int64 0..{ids.shape[-1] - 1}"
                     + (f" (repaired: {primary.label}'s were {ids.dtype}, not exactly 0..n-1)" if broken else ""))
    return notes


# --- the arithmetic ------------------------------------------------------------------------------

def _combine(first: torch.Tensor, others: list[Callable[[], torch.Tensor]], mode: str,
             coeffs: list[float]) -> torch.Tensor:
    """One key of the result, in fp32. Out-of-place first: `first` may be a read-only mmap."""
    if mode == "add_difference":
        b, c = (read().to(torch.float32) for read in others)
        return first.to(torch.float32) + (b - c) * coeffs[1]
    acc = first.to(torch.float32) * coeffs[0]
    for read, w in zip(others, coeffs[1:]):
        acc.add_(read().to(torch.float32), alpha=w)  # one input tensor in RAM at a time
    return acc


def _merge_state(models: list[_Input], merged: set[str], mode: str, coeffs: list[float],
                 dtype: torch.dtype, progress: bool) -> dict[str, torch.Tensor]:
    from dbnb.progress import bar as tqdm

    state: dict[str, torch.Tensor] = {}
    for key in tqdm(list(models[0].entries), desc="merging", unit="key", disable=not progress):
        read, shape = models[0].entries[key]
        if key == POSITION_IDS:
            state[key] = torch.arange(shape[-1]).reshape(shape)
            continue
        first = read()
        if _component(key) is None:  # ldm's schedule buffers: bit for bit, in their own dtype
            state[key] = first.clone()
        elif _component(key) not in merged or not first.is_floating_point():
            # copies: a result that aliased an input would keep the input's mapped pages resident
            state[key] = first.to(dtype, copy=True) if first.is_floating_point() else first.clone()
        else:
            state[key] = _combine(first, [m.entries[key][0] for m in models[1:]], mode, coeffs).to(dtype)
    return state


# --- writing -------------------------------------------------------------------------------------

def _outputs(out_file, out_dir, name: str, overwrite: bool) -> tuple[Path | None, Path | None]:
    if out_file is None and out_dir is None:
        from dbnb.export import free_name

        out_file = free_name(Path("merges"), file_stem(name), ".safetensors", overwrite)
    file = Path(out_file).expanduser() if out_file is not None else None
    if file is not None and file.suffix.lower() not in (".safetensors", ".ckpt"):
        raise MergeError(f"{file}: the merged file must end in .safetensors or .ckpt.")
    if file is not None and file.exists() and not overwrite:
        raise MergeError(f"{file} exists; choose another name or pass overwrite=True (CLI: --overwrite).")
    folder = Path(out_dir).expanduser() if out_dir is not None else None
    if folder is not None and folder.exists() and any(folder.iterdir()):
        raise MergeError(f"{folder} exists and is not empty; choose a new folder for the diffusers model.")
    from dbnb.env import check_writable

    for target in (file, folder):
        if target is not None:  # before the inputs are read and merged, which takes minutes
            check_writable(target.parent, "the merged model")
    return file, folder


def _input_info(m: _Input) -> dict:
    return {"label": m.label, "source": m.source, "sha256": m.sha256, "short_hash": m.sha256[:10],
            "legacy_hash": legacy_hash(m.path) if m.path.is_file() else None,
            "recipe": m.metadata.get("dbnb_merge_recipe") or None}


def _metadata(info: dict) -> dict[str, str]:
    """dbnb's own keys, plus the webui's `sd_merge_models` (its metadata viewer lists the inputs)."""
    models = {i["sha256"]: {"name": i["label"], "legacy_hash": i["legacy_hash"], "sd_merge_recipe": i["recipe"]}
              for i in info["inputs"]}
    webui_recipe = {"type": "dbnb", "recipe": info["recipe"], "interp_method": info["mode"],
                    "model_hashes": [i["sha256"] for i in info["inputs"]], "multipliers": info["coefficients"],
                    "save_as_half": info["dtype"] == "fp16", "custom_name": info["name"]}
    return {"format": "pt", "dbnb_version": __version__, "dbnb_merge_name": info["name"],
            "dbnb_merge_recipe": info["recipe"], "dbnb_merge": json.dumps(info, ensure_ascii=False),
            "sd_merge_recipe": json.dumps(webui_recipe, ensure_ascii=False),
            "sd_merge_models": json.dumps(models, ensure_ascii=False)}


def _write_folder(single_file: Path, folder: Path, info: dict) -> None:
    """The written file → a diffusers folder to train from (renamed into place when complete).

    Always fp32, whatever the file's dtype: training keeps fp32 master weights, and
    load_pipeline keeps a saved fp16 text encoder in fp16 (transformers 5 loads the saved
    dtype), which the trainer cannot train on. fp16 values are stored exactly in fp32."""
    from dbnb.models import load_pipeline
    from dbnb.tiny import save_tokenizer

    pipe = load_pipeline(str(single_file), dtype=torch.float32)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_tokenizer(pipe.tokenizer, tmp / "tokenizer")
    (tmp / "dbnb_merge.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    if folder.exists():
        folder.rmdir()
    os.replace(tmp, folder)


def _write_sidecar(file: Path, info: dict) -> None:
    """<stem>.json beside the file: the result's own hash (it cannot be inside the file it
    hashes). The webui reads this file as the model's user metadata, so the recipe shows on
    the model's card in its checkpoint list."""
    title = info["recipe"] if info["name"] == info["recipe"] else f"{info['name']}: {info['recipe']}"
    sidecar = {"description": f"{title} (merged by dbnb)",
               "notes": "inputs: " + ", ".join(f"{i['label']} [{i['short_hash']}]" for i in info["inputs"]),
               "dbnb_merge": info}
    file.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False), encoding="utf-8")


def _write(state, info, file: Path | None, folder: Path | None, log) -> tuple[str, str]:
    """Write the file and / or folder; returns (sha256, short hash) of the result."""
    from dbnb.env import check_free_space

    target = file or folder.with_name(f".{folder.name}.merge.safetensors")  # folder only: a scratch file
    remove_leftovers(target.parent)  # a merge killed earlier: its hidden half-file holds the disk
    check_free_space(target.parent, sum(t.numel() * t.element_size() for t in state.values()), "the merged model")
    write_single_file(target, state, metadata=_metadata(info))
    state.clear()  # the caller's dict: frees the result before the folder is built from the file
    sha = sha256_of(target)
    if file is not None:
        info = {**info, "sha256": sha, "short_hash": sha[:10]}
        _write_sidecar(file, info)
        log(f"merged file: {file}  [{sha[:10]}]")
    if folder is not None:
        try:
            _write_folder(target, folder, info)
        finally:
            if file is None:
                target.unlink(missing_ok=True)
        if file is None:  # the folder's own hash (of its weight files), kept beside them
            sha = sha256_of(folder)
            record = folder / "dbnb_merge.json"
            record.write_text(json.dumps({**info, "sha256": sha, "short_hash": sha[:10]}, indent=2,
                                         ensure_ascii=False), encoding="utf-8")
        log(f"diffusers folder: {folder}  " + (f"[{sha[:10]}]" if file is None else f"(from {file.name})"))
    return sha, sha[:10]


# --- the merge -----------------------------------------------------------------------------------

def merge(inputs: Sequence[str], weights: Sequence[float] | None = None, *, mode: str = "weighted_sum",
          alpha: float = 0.5, normalize: bool = True, labels: Sequence[str] | None = None,
          include_vae: bool = True, include_text_encoder: bool = True, unet_only: bool = False,
          dtype: str = "fp16", out_file: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
          name: str | None = None, overwrite: bool = False, cache_dir=None, progress: bool = True,
          log: Callable[[str], None] = print) -> MergeResult:
    """Merge SD 1.x models: a weighted sum of N (`weights`, default equal; normalised to sum 1
    unless normalize=False) or A + (B − C) × alpha (mode="add_difference", three inputs).

    Inputs are anything dbnb's loader takes (single files, diffusers folders, repo ids, URLs,
    Drive links); the first is the primary (see the module doc for the key rules). Writes
    `out_file` (.safetensors / .ckpt, original layout, with `<stem>.json` beside it) and / or
    `out_dir` (a diffusers folder to train from, always fp32); neither: merges/<recipe>.safetensors.
    """
    started = time.time()
    inputs = [str(s) for s in inputs]
    labels = list(labels) if labels is not None else [default_label(s) for s in inputs]
    if len(labels) != len(inputs):
        raise MergeError(f"{len(labels)} labels for {len(inputs)} models: give one label per model.")
    coeffs = coefficients(len(inputs), weights, mode=mode, alpha=alpha, normalize=normalize, labels=labels)
    if dtype not in DTYPES:
        raise MergeError(f"dtype {dtype!r}: choose fp16, fp32 or bf16.")
    merged = {"unet"} | ({"vae"} if include_vae and not unet_only else set()) \
        | ({"text_encoder"} if include_text_encoder and not unet_only else set())
    title = recipe(labels, weights, mode=mode, alpha=alpha, normalize=normalize)
    name = name or title
    file, folder = _outputs(out_file, out_dir, name, overwrite)
    with ExitStack() as stack:
        models = [_open_input(s, label, stack, cache_dir) for s, label in zip(inputs, labels)]
        _check(models, merged)
        sources = {f.resolve() for m in models for f in m.files}
        if file is not None and file.resolve() in sources:
            raise MergeError(f"{file} is one of the inputs; write the result to another file.")
        for m in models:
            m.sha256 = sha256_of(m.path)
            log(f"input {m.label}: [{m.sha256[:10]}] {m.source}")
        notes = _rule_notes(models, merged)
        for note in notes:
            log(note)
        log(f"recipe: {title}" + ("" if mode == "add_difference" else
                                  f"  (coefficients {', '.join(f'{c:.4g}' for c in coeffs)})"))
        info = {"name": name, "recipe": title, "mode": mode, "coefficients": coeffs, "dtype": dtype,
                "normalized": normalize, "merged": sorted(merged), "inputs": [_input_info(m) for m in models],
                "rules": notes, "dbnb_version": __version__}
        state = _merge_state(models, merged, mode, coeffs, DTYPES[dtype], progress)
        del models  # unmaps .ckpt inputs before the write, which needs the RAM
    _, short = _write(state, info, file, folder, log)
    return MergeResult(file, folder, name, title, short, info["inputs"], notes, time.time() - started)
