"""Base-model merging, as AUTOMATIC1111's Checkpoint Merger does it, without installing the webui:
SD 1.x models, or SDXL-family ones (one family per merge; dbnb.family.base.for_model says which).

The two recipes that training reports start from:

    weighted sum     "NAI 5, any 2.7, gape 2, SD1.4 0.3"   Σ wᵢ·modelᵢ, weights normalised to sum 1
                                                           by default (normalize=False: as given)
    add difference   "Any + (NAI nsfw − NAI sfw) × 0.4"    A + (B − C)·α

Merging is done in the family's single-file layout, as the webui does, so a diffusers folder input
is mapped to that layout key by key (the family's SingleFile.folder_entries); which keys are which part,
the EMA prefix and the position ids are its layout's (SingleFile.parts). Arithmetic is in fp32;
the result is cast to the output dtype. The first input is the *primary*: the result has its
key set, and whatever is not merged comes from it.

Memory: inputs are read one tensor at a time (safetensors through `safe_open`, `.ckpt` through
dbnb's safe loader with mmap, both reopened every 128 MiB so touched pages do not pile up), and
only the result is kept, in the output dtype, until it is written: a four-way SD 1.5 merge
peaks at 2.8 GiB RSS with fp16 output, 4.6 GiB with fp32 (bench/bench_merge.py); a two-way
full-size SDXL merge at 7.5-8.4 GiB with fp16 output, a 6.5 GiB result (bench/bench_merge_sdxl.py; fp32
output would hold a 13 GiB result, over a free Colab's RAM: a merge whose result and 2 GiB do not fit
in the free RAM is refused before its inputs are read).
The same merge of the same files gives the same .safetensors bytes, hence the same hash.

Inputs whose key sets differ are handled by these rules (SD 1.x's prefixes shown), printed when they apply:

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
    models of two families, or that    error naming them: SDXL's v_pred / ztsnr markers are kept when
      sample differently               every input has them, and a v-prediction model never merges
                                       with an epsilon one
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from dbnb import __version__
from dbnb.core.disk import check_free_space, check_writable
from dbnb.core.errors import DbnbError
from dbnb.core.precision import FILE_DTYPES
from dbnb.core.progress import bar as tqdm
from dbnb.core.source_names import public_name
from dbnb.core.weightfile import remove_leftovers
from dbnb.data.intake import free_name
from dbnb.family.base import Family, FileParts, SingleFile, card_of, for_model
from dbnb.family.source import ModelLoadError, fetch_model
from dbnb.family.sd1.singlefile import Entry, SDFileError, file_entries
from dbnb.ship.hashes import legacy_hash, sha256_of

MODES = ("weighted_sum", "add_difference")


# Peak RSS of a merge above its result: the open inputs' touched pages and the write (bench_merge.py,
# bench_merge_sdxl.py: 0.8 GiB for SD 1.5, up to 1.9 GiB for SDXL, on this CPU box).
MERGE_OVERHEAD_BYTES = 2 * 2 ** 30


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
    family: Family              # its model family: its single file's layout says which key is which part
    entries: dict[str, Entry]   # original-layout key → tensor, after the key rules
    files: list[Path]           # what its hash covers
    notes: list[str]
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def single_file(self) -> SingleFile:
        return self.family.single_file

    @property
    def parts(self) -> FileParts:
        return self.family.single_file.parts


# --- names and weights ---------------------------------------------------------------------------

def default_label(source: str) -> str:
    """A short name for an input: the file or folder stem, the repo name, the Drive file id's start."""
    return Path(public_name(source)).stem or str(source)


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

def _normalise(raw: dict[str, Entry], label: str, parts: FileParts) -> tuple[dict[str, Entry], list[str]]:
    """Apply the key rules that make files from different tools comparable."""
    out: dict[str, Entry] = {}
    ema, renamed = 0, dict.fromkeys(parts.renamed, 0)
    for key, entry in raw.items():
        if key.startswith(parts.ema):
            ema += 1
            continue
        old = next((o for o, new in parts.renamed.items() if key.startswith(o) and not key.startswith(new)), None)
        if old is not None:
            key, renamed[old] = parts.renamed[old] + key[len(old):], renamed[old] + 1
        if key in out:  # only a renamed key meets another: the rule is the one whose new prefix it has
            old, new = next((o, n) for o, n in parts.renamed.items() if key.startswith(n))
            raise MergeError(f"{label} holds {key!r} both under {old}* and under {new}*; which "
                             "one a loader uses is undefined, so dbnb does not guess. Re-save it with one.")
        out[key] = entry
    notes = []
    if ema:
        notes.append(f"{label}: dropped {ema} {parts.ema}* keys (the EMA copy; the webui and training use "
                     "the normal weights)")
    notes += [f"{label}: renamed {n} text-encoder keys from the old prefix {old}* to {parts.renamed[old]}*"
              for old, n in renamed.items() if n]
    return out, notes


def _family(source: str, label: str, where: str) -> Family:
    """The family of the model at `where`, which must have a single file to merge in."""
    family = for_model(where)
    if getattr(family.single_file, "parts", None) is None:
        raise MergeError(f"input {label!r} ({source}) is a {family.name} model, and dbnb cannot merge "
                         f"{family.name} models: it has no single-file layout to merge in. Merge SD 1.x or SDXL models.")
    return family


def _open_input(source: str, label: str, stack: ExitStack, cache_dir) -> _Input:
    # a local one before SD 1.x's loader judges the folder; a remote one once fetched (telling it first
    # would fetch it elsewhere)
    family = _family(source, label, source) if Path(source).expanduser().exists() else None
    try:
        path = Path(fetch_model(source, cache_dir))  # URLs, Drive links and repo ids land in the cache
    except ModelLoadError as e:
        raise MergeError(f"input {label!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 — the Hub offline, private, missing: the message says which
        raise MergeError(f"Could not fetch {source!r} from the Hugging Face Hub ({e}). Check the id, "
                         "set HF_TOKEN for a private repo, or download the model and give its path.") from None
    try:
        return _read_input(source, label, path, family or _family(source, label, str(path)), stack)
    except SDFileError as e:  # a folder that is not complete, or not its family's
        raise MergeError(str(e)) from None


def _read_input(source: str, label: str, path: Path, family: Family, stack: ExitStack) -> _Input:
    single_file = family.single_file
    if path.is_dir():
        raw, metadata = single_file.folder_entries(path, stack), {}
        info = path / "dbnb_merge.json"  # a folder dbnb merged: keep its recipe for nesting
        if info.is_file():
            metadata = {"dbnb_merge_recipe": json.loads(info.read_text(encoding="utf-8")).get("recipe", "")}
    else:
        raw, metadata = file_entries(path, stack)
    entries, notes = _normalise(raw, label, single_file.parts)
    return _Input(label, source, path, family, entries, single_file.weight_files(path), notes, metadata)


# --- checks --------------------------------------------------------------------------------------

def _shapes(model: _Input, component: str) -> dict[str, tuple]:
    return {k: shape for k, (_, shape) in model.entries.items()
            if k not in model.parts.exact and model.parts.part_of(k) == component}


def _check_kinds(models: list[_Input]) -> None:
    """One family, one architecture of it, one way of sampling."""
    primary = models[0]
    other = next((m for m in models[1:] if m.family is not primary.family), None)
    if other is not None:
        raise MergeError(f"{primary.label} is an {card_of(primary.family).short} model and {other.label} is an "
                         f"{card_of(other.family).short} model ({other.source}): models of different families do "
                         "not merge. Merge models of one family.")
    variants = {}
    for m in models:
        try:
            variants[m.label] = m.single_file.architecture(m.entries, {k: s for k, (_, s) in m.entries.items()}, m.source)
        except DbnbError as e:
            raise MergeError(f"{m.label} ({m.source}): {e}") from None
    if len(set(variants.values())) > 1:
        raise MergeError("the inputs are different architectures (" + ", ".join(
            f"{k}: {v}" for k, v in variants.items()) + "); merge models of one kind.")
    sampling = {m.label: m.single_file.sampling(m.entries) for m in models}
    if len(set(sampling.values())) > 1:
        raise MergeError("the inputs sample differently (" + ", ".join(f"{k}: {v}" for k, v in sampling.items())
                         + "): a merge of a v-prediction model and an epsilon one predicts neither. Merge models "
                           "that predict the same thing (NoobAI v-pred only with other v-pred models).")


def _check_ram(primary: _Input, dtype: str) -> None:
    """The result is held in RAM until it is written: refused before the inputs are read where it
    cannot fit, which on a free Colab (12.7 GB) kills the kernel and everything in it."""
    import psutil  # lazy: loads psutil
    import safetensors.torch

    size = FILE_DTYPES[dtype].itemsize
    result = sum(math.prod(shape) for _, shape in primary.entries.values()) * size
    # safetensors before its zero-copy writer (_flatten_as_ptr) turns every tensor into bytes first: a
    # second copy of the result while it writes (0.4.3, the oldest dbnb takes, does)
    held = result * (1 if hasattr(safetensors.torch, "_flatten_as_ptr") else 2)
    free = psutil.virtual_memory().available
    if held + MERGE_OVERHEAD_BYTES <= free:
        return
    gib = 2 ** 30
    half = (f" With dtype='fp16' (CLI: --dtype fp16) it is {result / size * 2 / gib:.1f} GiB."
            if size > 2 else "")
    raise MergeError(f"This merge holds its {dtype} result in RAM until it is written: {result / gib:.1f} GiB, "
                     f"about {(held + MERGE_OVERHEAD_BYTES) / gib:.1f} GiB at the peak, and this machine has "
                     f"{free / gib:.1f} GiB free.{half} Or close what else holds RAM (another notebook's "
                     "runtime), or merge on a machine with more.")


def _check(models: list[_Input], merged: set[str]) -> None:
    """One family and architecture, a complete primary: before minutes of reading, not after."""
    _check_kinds(models)
    primary = models[0]
    for component, prefixes in primary.parts.prefixes.items():
        if not _shapes(primary, component):
            raise MergeError(f"{primary.label} has no {component} ({prefixes[0]}*). The first "
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
                                 f"keys differ ({len(diff)}, e.g. {diff[0]!r}). Only models of one "
                                 "architecture merge.")
            bad = next((k for k in want if want[k] != got[k]), None)
            if bad:
                raise MergeError(f"{primary.label} and {m.label} are different architectures: {bad} is "
                                 f"{list(want[bad])} in one and {list(got[bad])} in the other (an inpainting "
                                 "model with a normal one?). Only models of one architecture merge.")


def _rule_notes(models: list[_Input], merged: set[str]) -> list[str]:
    primary, notes = models[0], [n for m in models for n in m.notes]
    for component in primary.parts.prefixes:
        if component not in merged:
            notes.append(f"{component}: copied from {primary.label}, not merged")
    extras = [k for k in primary.entries if primary.parts.part_of(k) is None]
    if extras:
        notes.append(f"{len(extras)} non-model keys ({', '.join(extras[:3])}{', …' if len(extras) > 3 else ''}) "
                     f"copied from {primary.label} unchanged, not merged")
    ignored = sum(k not in primary.entries for m in models[1:] for k in m.entries)
    if ignored:
        notes.append(f"{ignored} keys that only other inputs hold (buffers, position_ids) ignored")
    for key in (k for k in primary.parts.exact if k in primary.entries):
        ids = primary.entries[key][0]()
        exact = torch.arange(ids.shape[-1]).reshape(ids.shape)
        broken = ids.dtype != torch.int64 or not torch.equal(ids, exact)
        notes.append(f"{key.rsplit('.', 1)[-1]}: not averaged; written as int64 0..{ids.shape[-1] - 1}"
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
    state: dict[str, torch.Tensor] = {}
    parts = models[0].parts
    for key in tqdm(list(models[0].entries), desc="merging", unit="key", disable=not progress):
        read, shape = models[0].entries[key]
        if key in parts.exact:
            state[key] = torch.arange(shape[-1]).reshape(shape)
            continue
        first = read()
        if parts.part_of(key) is None:  # ldm's schedule buffers, SDXL's markers: bit for bit, in their own dtype
            state[key] = first.clone()
        elif parts.part_of(key) not in merged or not first.is_floating_point():
            # copies: a result that aliased an input would keep the input's mapped pages resident
            state[key] = first.to(dtype, copy=True) if first.is_floating_point() else first.clone()
        else:
            state[key] = _combine(first, [m.entries[key][0] for m in models[1:]], mode, coeffs).to(dtype)
    return state


# --- writing -------------------------------------------------------------------------------------

def _outputs(out_file, out_dir, name: str, overwrite: bool) -> tuple[Path | None, Path | None]:
    if out_file is None and out_dir is None:
        out_file = free_name(Path("merges") / f"{file_stem(name)}.safetensors", overwrite)
    file = Path(out_file).expanduser() if out_file is not None else None
    if file is not None and file.suffix.lower() not in (".safetensors", ".ckpt"):
        raise MergeError(f"{file}: the merged file must end in .safetensors or .ckpt.")
    if file is not None and file.exists() and not overwrite:
        raise MergeError(f"{file} exists; choose another name or pass overwrite=True (CLI: --overwrite).")
    folder = Path(out_dir).expanduser() if out_dir is not None else None
    if folder is not None and folder.exists() and any(folder.iterdir()):
        raise MergeError(f"{folder} exists and is not empty; choose a new folder for the diffusers model.")

    for target in (file, folder):
        if target is not None:  # before the inputs are read and merged, which takes minutes
            check_writable(target.parent, "the merged model")
    return file, folder


def _input_info(m: _Input) -> dict:
    return {"label": m.label, "source": public_name(m.source), "sha256": m.sha256, "short_hash": m.sha256[:10],
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


def _write_sidecar(file: Path, info: dict) -> None:
    """<stem>.json beside the file: the result's own hash (it cannot be inside the file it
    hashes). The webui reads this file as the model's user metadata, so the recipe shows on
    the model's card in its checkpoint list."""
    title = info["recipe"] if info["name"] == info["recipe"] else f"{info['name']}: {info['recipe']}"
    sidecar = {"description": f"{title} (merged by dbnb)",
               "notes": "inputs: " + ", ".join(f"{i['label']} [{i['short_hash']}]" for i in info["inputs"]),
               "dbnb_merge": info}
    file.with_suffix(".json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False), encoding="utf-8")


def _write(single_file: SingleFile, state, info, file: Path | None, folder: Path | None, log) -> tuple[str, str]:
    """Write the file and / or folder; returns (sha256, short hash) of the result."""
    target = file or folder.with_name(f".{folder.name}.merge.safetensors")  # folder only: a scratch file
    remove_leftovers(target.parent)  # a merge killed earlier: its hidden half-file holds the disk
    check_free_space(target.parent, sum(t.numel() * t.element_size() for t in state.values()), "the merged model",
                     "Free some space there, or write the merge elsewhere (--out FILE / --diffusers FOLDER).")
    single_file.write(target, state, metadata=_metadata(info))
    state.clear()  # the caller's dict: frees the result before the folder is built from the file
    sha = sha256_of(target)
    if file is not None:
        info = {**info, "sha256": sha, "short_hash": sha[:10]}
        _write_sidecar(file, info)
        log(f"merged file: {file}  [{sha[:10]}]")
    if folder is not None:
        try:
            single_file.to_folder(target, folder, {"dbnb_merge.json": info})
        finally:
            if file is None:
                target.unlink(missing_ok=True)
        if file is None:  # the folder's own hash (of its weight files), kept beside them
            sha = sha256_of(*single_file.weight_files(folder))
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
    """Merge SD 1.x or SDXL models (of one family): a weighted sum of N (`weights`, default equal; normalised to sum 1
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
    if dtype not in FILE_DTYPES:
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
        _check_ram(models[0], dtype)
        for m in models:
            m.sha256 = sha256_of(*m.files)
            log(f"input {m.label}: [{m.sha256[:10]}] {m.source}")
        notes = _rule_notes(models, merged)
        for note in notes:
            log(note)
        log(f"recipe: {title}" + ("" if mode == "add_difference" else
                                  f"  (coefficients {', '.join(f'{c:.4g}' for c in coeffs)})"))
        info = {"name": name, "recipe": title, "mode": mode, "coefficients": coeffs, "dtype": dtype,
                "normalized": normalize, "merged": sorted(merged), "inputs": [_input_info(m) for m in models],
                "rules": notes, "dbnb_version": __version__}
        state = _merge_state(models, merged, mode, coeffs, FILE_DTYPES[dtype], progress)
        single_file = models[0].single_file
        del models  # unmaps .ckpt inputs before the write, which needs the RAM
    _, short = _write(single_file, state, info, file, folder, log)
    return MergeResult(file, folder, name, title, short, info["inputs"], notes, time.time() - started)
