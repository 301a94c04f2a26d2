"""One file that AUTOMATIC1111's webui loads: a run's checkpoint (or any model) → its family's
single file (dbnb.family.base.SingleFile; SD 1.x: `.safetensors` / `.ckpt` in the original
layout), verified by reading it back.

The trained parts come from the run's checkpoint (the denoiser, or its EMA; the encoder when
it was trained); the rest (autoencoder, untouched encoder) from the run's base model. Every
export is read back as its users' loaders read it (SD 1.x: diffusers' `from_single_file`) and
compared tensor by tensor with what was meant to be written; a file that does not match is deleted.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dbnb import __version__
from dbnb.core import platform
from dbnb.core.config import load_config
from dbnb.core.disk import (DiskFullError, check_free_space, check_writable, format_bytes, free_disk_bytes,
                            is_disk_full, write_errors)
from dbnb.core.download import is_url
from dbnb.core.errors import DbnbError
from dbnb.core.platform import shown
from dbnb.core.precision import FILE_DTYPES
from dbnb.core.source_names import public_name
from dbnb.core.weightfile import remove_leftovers, write_safetensors
from dbnb.data.intake import free_name
from dbnb.family import lora
from dbnb.family.base import Family, SingleFile, default, for_model, resolve_clip_skip
from dbnb.family.lora import merged_state_dict
from dbnb.run.folder import RunFolder
from dbnb.ship import kohya

FORMATS = tuple(suffix.lstrip(".") for suffix in default().single_file.suffixes)


class ExportError(DbnbError, RuntimeError):
    """The export could not be made or did not verify; the message says why and what to do."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    size: int
    step: int | None
    verified: bool

    def line(self) -> str:
        """The export as it is reported: where (relative to a notebook's workspace), how big, verified."""
        return f"{shown(self.path)}  {format_bytes(self.size)}  {'verified / 確認済み' if self.verified else 'not verified'}"


# --- what to export ----------------------------------------------------------------------------

def run_state_dicts(run: RunFolder, step: int | None, ema: bool, dtype: torch.dtype, vae: str = ""):
    """(denoiser, autoencoder, encoder) state dicts of a run's checkpoint, plus (step, config).
    A LoRA checkpoint is baked: its adapters merged into the base model."""
    config = load_config(run.config_path)
    checkpoint = run.pick(step)
    checkpoint.require(ema)
    family = checkpoint.family
    if checkpoint.kind == "lora":
        base = family.open(config.pretrained_model_name_or_path, autoencoder=vae or config.pretrained_vae_name_or_path,
                           revision=config.revision, dtype=torch.float32)  # merged in fp32, then cast
        checkpoint.load_into(base.denoiser, base.encoder, ema=ema)
        cast = lambda sd: {k: v.to(dtype) for k, v in sd.items()}  # noqa: E731
        return (cast(merged_state_dict(base.denoiser)), cast(base.autoencoder.state_dict()),
                cast(merged_state_dict(base.encoder)), checkpoint.step, config)
    base = family.open(config.pretrained_model_name_or_path, autoencoder=vae or config.pretrained_vae_name_or_path,
                       revision=config.revision, dtype=dtype)
    base.denoiser = base.pipe = None  # replaced by the trained one; dropping it first keeps peak RAM down
    # cast tensor by tensor while reading: never two full copies in RAM
    denoiser = checkpoint.denoiser_state(ema, dtype)
    encoder = checkpoint.encoder_state(dtype)
    return denoiser, base.autoencoder.state_dict(), encoder if encoder is not None else base.encoder.state_dict(), \
        checkpoint.step, config


def model_state_dicts(source: str, dtype: torch.dtype, vae: str = ""):
    """(denoiser, autoencoder, encoder) state dicts of any model dbnb can load."""
    base = for_model(source).open(source, autoencoder=vae, dtype=dtype)
    return base.denoiser.state_dict(), base.autoencoder.state_dict(), base.encoder.state_dict()


def refuse_runs_folder(folder: Path) -> None:
    """An ExportError when `folder` is output_dir, the folder of run folders, given instead of a
    run: it would be read as a model folder and refused for a missing model_index.json, which
    hides that one run inside is what was meant."""
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return
    runs = sorted(d for d in folder.iterdir()
                  if RunFolder(d).config_path.is_file() and RunFolder(d).checkpoints_dir.is_dir())
    if not runs:
        return

    steps = {d: RunFolder(d).checkpoints() for d in runs}
    listing = ", ".join(f"{d.name} ({f'newest checkpoint: step {found[-1].step}' if found else 'no checkpoint yet'})"
                        for d, found in steps.items())
    example = next((d for d, found in steps.items() if found), runs[0])
    raise ExportError(f"{folder} holds run folders, not a run: {listing}. Export one run: "
                      f"`dbnb export {shlex.quote(str(example))}` (its newest checkpoint; --step N for another).")


# --- where it goes -------------------------------------------------------------------------------

def destination_folder(where: str, run_name: str, default: Path) -> Path:
    """`local` (default), `drive` (Colab: MyDrive/dbnb/<run>), `storage` (Paperspace), or a path."""
    if where in ("", "local"):
        return default
    if is_url(where):
        raise ExportError(f"--to {where}: a link cannot be written to; give a folder on this machine (CLI: --to PATH; "
                          "notebook 04: export_to), or --to drive for Google Drive on Colab. To share the file, "
                          "upload it with --hub REPO.")
    if where == "drive":
        if platform.detect_platform() != "colab":
            raise ExportError("--to drive works on Google Colab only; use --to PATH here.")
        return (platform.persistent_dir("colab") or platform.mount_drive()) / run_name
    if where == "storage":
        folder = platform.persistent_dir("paperspace")
        if folder is None:
            raise ExportError("--to storage: no Paperspace persistent storage (/storage or /notebooks) here.")
        return folder / run_name
    return Path(where).expanduser()


def prepare_folder(folder: Path, needed: int) -> None:
    check_writable(folder, "the exported model")
    check_free_space(folder, needed, "the exported model", room_advice(folder))


def room_advice(folder: Path) -> str:
    """What to do when the export does not fit: the run's checkpoints are not in the way (an
    export reads them), another target is the quick fix."""
    return (f"Export to a place with room (CLI: --to PATH, or --to drive on Colab; notebook 04: export_to), "
            f"or free space at {folder}, then export again.")


def write_export(path: Path, state: dict, write: Callable[..., Path], **options) -> Path:
    """`write(path, state, **options)` (the family's single-file writer, or the LoRA file's), with a
    disk that fills during the write named as such. Nothing is left behind: the writer deletes
    its half-written temporary file."""
    try:
        return write(path, state, **options)
    except write_errors() as e:
        if isinstance(e, DbnbError) or not is_disk_full(e):
            raise
        free = free_disk_bytes(path.parent)
        raise DiskFullError(f"Disk full at {path.parent} while writing the export {path.name} (free "
                            f"{format_bytes(free)}); the half-written file was deleted. {room_advice(path.parent)}",
                            free=free, path=path.parent) from None


# --- verify --------------------------------------------------------------------------------------

def verify(path: Path, parts: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype, family: Family,
           base: str = "") -> None:
    """Demand every key and tensor of the file, exactly, in two passes so that RAM never holds the
    model twice (a full SDXL is 6.5 GB in fp16): the file against `parts` (the state dicts by role:
    denoiser, autoencoder, encoder), a tensor read at a time; then, with `parts` emptied (the
    caller keeps no other reference), the file read back as its users' loaders read it against the
    file again. The key set is checked on its own: loaders such as from_single_file ignore extra keys
    silently. `base`: the model the parts come from (SDXL files mark its prediction type)."""
    single_file = family.single_file
    original_keys = single_file.keys(parts["denoiser"], parts["autoencoder"], parts["encoder"], base=base)
    keys, shapes = single_file.keys_and_shapes(path)
    missing, extra = original_keys - set(keys), set(keys) - original_keys
    if missing or extra:
        raise ExportError(f"{path.name}: {len(missing)} keys missing, {len(extra)} unexpected "
                          f"(e.g. {sorted(missing or extra)[0]}).")
    _compare_with_file(path, single_file.state_dict(parts["denoiser"], parts["autoencoder"], parts["encoder"],
                                                    base=base), "written", single_file)
    parts.clear()
    try:
        read = single_file.read_back(path, keys, shapes, dtype)
    except Exception as e:  # noqa: BLE001 — whatever the loader trips on, the file is bad
        raise ExportError(f"{path.name} does not load back with diffusers' from_single_file: {e}") from e
    roles = (read.denoiser.state_dict(), read.autoencoder.state_dict(), read.encoder.state_dict())
    try:
        loaded = single_file.state_dict(*roles, base=base)
    except ValueError as e:  # the loader built other parts than the file's keys say
        raise ExportError(f"{path.name}: read back as other parts than were written ({e}).") from e
    _compare_with_file(path, loaded, "read back", single_file)


def _compare_with_file(path: Path, state: dict[str, torch.Tensor], what: str, single_file: SingleFile) -> None:
    """Each tensor of `state` equal to the file's, in key and dtype; the file read a tensor at a time."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        entries = single_file.entries(path, stack)
        if state.keys() != entries.keys():
            raise ExportError(f"{path.name}: {what} with different keys ({sorted(state.keys() ^ entries.keys())[:3]}).")
        for key, want in state.items():
            got = entries[key][0]()
            if want.is_meta or got.dtype != want.dtype or not torch.equal(got, want.to(got.device)):
                raise ExportError(f"{path.name}: {key} {what} different from what was meant to be written.")


# --- the export ----------------------------------------------------------------------------------

def export(source: str | Path, *, step: int | None = None, ema: bool = False, fmt: str = "safetensors",
           precision: str = "fp16", vae: str = "", to: str = "", overwrite: bool = False,
           name: str = "", bake: bool = False) -> ExportResult:
    """Export a run (its checkpoint `step`, default the latest) or a model folder / file. A LoRA
    run's checkpoint becomes a LoRA file, or with `bake` a full model with the LoRA merged in."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}: choose safetensors or ckpt.")
    if precision not in FILE_DTYPES:
        raise ExportError(f"precision {precision!r}: choose fp16, fp32 or bf16.")
    dtype = FILE_DTYPES[precision]
    run = RunFolder(source)
    if not run.config_path.is_file():
        refuse_runs_folder(Path(source))
    family = run.family if run.config_path.is_file() else for_model(str(source))
    if run.config_path.is_file() and not bake and run.pick(step).kind == "lora":  # any family: plain safetensors
        return export_lora(run, run.pick(step), ema=ema, fmt=fmt, precision=precision, to=to,
                           overwrite=overwrite, name=name)
    if family.single_file is None:
        kept = (f"its checkpoints under {run.checkpoints_dir} are diffusers folders (full runs) or peft adapters "
                "(lora/), which diffusers loads" if run.config_path.is_file() else "use the diffusers folder as it is")
        raise ExportError(f"{source}: a {family.name} model cannot be exported to one file yet (dbnb has no "
                          f"writer for its files); {kept}.")
    if run.config_path.is_file():
        denoiser, autoencoder, encoder, step, config = run_state_dicts(run, step, ema, dtype, vae)
        label = config.run_name
        stem = name or f"{label}_{step}" + ("_ema" if ema else "")
        default, base_model = run.exports_dir, config.pretrained_model_name_or_path
        info = {"dbnb_instance_prompt": config.instance_prompt, "dbnb_resolution": str(config.resolution),
                "dbnb_class_prompt": config.class_prompt, "dbnb_ema": str(ema).lower(),
                "ss_clip_skip": str(resolve_clip_skip(family, config.clip_skip))}  # what to render it at
    else:
        denoiser, autoencoder, encoder = model_state_dicts(str(source), dtype, vae)
        label = Path(str(source).rstrip("/")).stem
        stem = name or label
        default, base_model, info, step = Path("exports"), str(source), {}, None
    state = family.single_file.state_dict(denoiser, autoencoder, encoder, base=base_model)
    folder = destination_folder(to, label, default)
    family.single_file.remove_leftovers(folder)  # an export killed earlier: its hidden half-file holds the disk
    prepare_folder(folder, sum(t.numel() * t.element_size() for t in state.values()))
    path = free_name(folder / f"{stem}.{fmt}", overwrite)
    metadata = {"format": "pt", "dbnb_version": __version__, "dbnb_base_model": public_name(base_model),
                "dbnb_precision": precision, **info}
    write_export(path, state, family.single_file.write, metadata=metadata, global_step=step)
    parts = {"denoiser": denoiser, "autoencoder": autoencoder, "encoder": encoder}
    del state, denoiser, autoencoder, encoder  # verify drops the parts before the read-back: one model in RAM
    try:
        verify(path, parts, dtype, family, base=base_model)
    except Exception:
        path.unlink(missing_ok=True)  # a file that did not verify must not reach the webui
        raise
    return ExportResult(path, path.stat().st_size, step, True)


def export_lora(run: RunFolder, checkpoint, *, ema: bool, fmt: str, precision: str, to: str, overwrite: bool,
                name: str) -> ExportResult:
    """The checkpoint's adapters as one kohya-layout LoRA file, read back with diffusers'
    `load_lora_weights` onto the base model: its outputs must be the checkpoint's."""
    if fmt != "safetensors":
        raise ExportError(f"format {fmt}: a LoRA is exported as .safetensors (what the webui's models/Lora "
                          "folder takes); leave out --format, or add --bake for a full model file.")
    config, dtype, family = load_config(run.config_path), FILE_DTYPES[precision], checkpoint.family
    spec, denoiser, encoder = checkpoint.adapters(ema)
    state = kohya.kohya_state_dict(denoiser, encoder, spec, dtype, family.parts)
    stem = name or f"{config.run_name}_{checkpoint.step}" + ("_ema" if ema else "")
    folder = destination_folder(to, config.run_name, run.exports_dir)
    remove_leftovers(folder)
    prepare_folder(folder, sum(t.numel() * t.element_size() for t in state.values()))
    path = free_name(folder / f"{stem}.safetensors", overwrite)

    def base():
        return family.open(config.pretrained_model_name_or_path, autoencoder=config.pretrained_vae_name_or_path,
                           revision=config.revision, dtype=torch.float16)
    models = base()
    prediction_type = models.pipe.scheduler.config.get("prediction_type", "epsilon")
    write_export(path, state, write_safetensors,
                 metadata={**kohya.metadata(config, spec, checkpoint.step, path.stem, __version__, family,
                                            prediction_type),
                           "dbnb_precision": precision, "dbnb_ema": str(ema).lower()})
    try:
        checkpoint.load_into(models.denoiser, models.encoder, ema=ema)
        with torch.no_grad():  # what the file can hold: the adapters at its precision
            for p in lora.trainable(models.denoiser, models.encoder):
                p.copy_(p.to(dtype).float())
        expected = kohya.outputs(models, family)
        del models
        kohya.verify(path, expected, base, family)
    except Exception:
        path.unlink(missing_ok=True)  # a file that did not verify must not reach the webui
        raise
    return ExportResult(path, path.stat().st_size, checkpoint.step, True)


def upload_to_hub(path: Path, repo_id: str, api=None) -> str:
    """Upload an export to a private Hub model repo; the token comes from HF_TOKEN or
    `huggingface-cli login`, and is never printed."""
    from huggingface_hub import HfApi  # lazy: loads huggingface_hub

    api = api or HfApi()
    api.create_repo(repo_id, private=True, exist_ok=True, repo_type="model")
    api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, repo_type="model")
    card = path.parent / "README.md"  # dbnb.ship.report.model_card writes it beside the export
    if card.is_file():
        api.upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=repo_id, repo_type="model")
    return f"https://huggingface.co/{repo_id}/blob/main/{path.name}"


def convert(single_file: str | Path, out_dir: str | Path) -> Path:
    """A single file → a diffusers folder (to train from, or to merge), as its family reads it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new folder.")
    check_writable(out_dir.parent, "the diffusers folder")
    return for_model(str(single_file)).single_file.to_folder(single_file, out_dir,
                                                             {"dbnb_source.json": {"converted_from": str(single_file)}})
