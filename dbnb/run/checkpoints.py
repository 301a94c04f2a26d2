"""A checkpoint: one saved step of a run, in its run folder's checkpoints/ (dbnb.run.folder).

What one holds and how it goes into a pipeline (`Checkpoint`, `load_into`); what the trainer
writes into one and reads back on resume (`save_checkpoint`, `load_checkpoint`,
`load_optimizer_state`), with the disk it needs. The run folder writes it under a temporary
name and renames it into place (`RunFolder.write_checkpoint`), and prunes old resume states.
"""
from __future__ import annotations

import importlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dbnb.core import weights
from dbnb.core.disk import DiskFullError, check_free_space, format_bytes, free_disk_bytes, is_disk_full, write_errors
from dbnb.family import lora
from dbnb.family.base import Family, Part, default, under
from dbnb.run.lock import RunFolderError

if TYPE_CHECKING:
    from dbnb.family.lora import Spec
    from dbnb.run.folder import RunFolder

STEP_DIR = re.compile(r"^step-(\d{6,})$")

# A checkpoint folder's layout. Only this module spells it: everything else asks a Checkpoint.
# The parts' names are their family's (dbnb.family.base.Part; SD 1.x: unet, text_encoder, unet_ema).
#   full: unet/ [text_encoder/] [unet_ema/]   diffusers / transformers folders of the trained
#         models, in fp16: what test rendering and export use, kept for every save; a part of
#         several models (Part.members) holds a model folder of each, under their names: SDXL's
#         text_encoders/te1/ (CLIP-L) and text_encoders/te2/ (bigG), each a transformers folder as
#         diffusers' text_encoder/ and text_encoder_2/ are (one ModuleDict has no such folder)
#   lora: lora/ adapters.json unet.safetensors [text_encoder.safetensors] [ema.safetensors]
#   both: state/ optimizer.pt lr_scheduler.pt [ema.pt] trainer.json   (resume only; keep_last_n prunes it)
#   full: state/ unet.safetensors [text_encoder.safetensors] [unet_ema.safetensors]: the fp32 master
#         weights (a part of several models: one file of their ModuleDict's keys), so a resume
#         continues exactly (checkpoints written before 2026-12-06 hold fp32 weights in unet/ and
#         no master copy: a resume reads those)
LORA, STATE = "lora", "state"
# Per-step weights: fp16 halves every save (SD 1.5's UNet: 1.72 GB against 3.44) and is what
# rendering and the fp16 export read anyway; training's fp32 master copy lives in the state.
WEIGHTS_DTYPE = torch.float16
FULL = "full"


class CheckpointError(RunFolderError):
    """A checkpoint lacks what was asked of it, or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved step of a run of a `family`'s model: what it holds and how it goes into the model."""
    step: int
    path: Path
    family: Family = field(default_factory=default, compare=False, repr=False)

    @classmethod
    def at(cls, path: Path, family: Family | None = None) -> "Checkpoint | None":
        m = STEP_DIR.match(Path(path).name)
        return cls(int(m.group(1)), Path(path), family or default()) if m and Path(path).is_dir() else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        """"full" (the trained models) or "lora" (adapters on the base model)."""
        return LORA if (self.path / LORA).is_dir() else FULL

    @property
    def parts(self) -> frozenset[str]:
        """What it holds: its parts by name (SD 1.x: "unet", "text_encoder"), "ema" (as weights, or
        as adapters for kind lora), and "state" when it can be resumed."""
        parts = self.family.parts
        if self.kind == LORA:
            held = lora.held_parts(self.path / LORA, parts)
        else:
            held = {n for n, part, ema in ((parts.denoiser.name, parts.denoiser, False),
                                           (parts.encoder.name, parts.encoder, False),
                                           ("ema", parts.denoiser, True)) if self._holds(part, ema)}
        return frozenset(held | ({"state"} if self.resumable else set()))

    @property
    def holds_encoder(self) -> bool:
        """Whether it holds a trained encoder (as weights or adapters)."""
        return self.family.parts.encoder.name in self.parts

    @property
    def resumable(self) -> bool:
        return (self.path / STATE / "trainer.json").is_file()

    def trainer_state(self) -> dict:
        return json.loads((self.path / STATE / "trainer.json").read_text(encoding="utf-8"))

    def drop_state(self) -> None:
        """Delete the resume state (optimizer etc., the bulk); the trained weights stay."""
        shutil.rmtree(self.path / STATE)

    def require(self, ema: bool = False) -> None:
        """Raise unless this checkpoint has trained weights (their EMA when `ema`)."""
        if ema and "ema" not in self.parts:
            raise CheckpointError(f"{self.path} has no EMA weights: this run was trained without use_ema; "
                                  "leave out --ema (notebook: ema = False).")
        denoiser = self.family.parts.denoiser
        if denoiser.name not in self.parts:
            raise CheckpointError(f"{self.path} has no trained {denoiser.label}: the checkpoint is incomplete; "
                                  "choose another step.")

    def _weights_files(self, part: Part, ema: bool = False) -> list[Path]:
        """The part's weights file, or one per member for a part of several models."""
        folder = self.path / (part.ema if ema else part.name)
        return [folder / member / part.file for member in part.members] or [folder / part.file]

    def _holds(self, part: Part, ema: bool = False) -> bool:
        return all(file.is_file() for file in self._weights_files(part, ema))

    def part_state(self, part: Part, ema: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The saved weights of `part` (of its EMA) as its module's state dict: for a part of several
        models, their ModuleDict's (each member's keys under its name, as the trainer holds them)."""
        files = self._weights_files(part, ema)
        if not part.members:
            return weights.read_safetensors(files[0], dtype)
        return {f"{member}.{k}": v for member, file in zip(part.members, files)
                for k, v in weights.read_safetensors(file, dtype).items()}

    def files(self, ema: bool = False) -> list[Path]:
        """The weight files that `load_into(denoiser, encoder, ema)` reads (to tell when they change)."""
        if self.kind == LORA:
            return sorted((self.path / LORA).glob("*"))
        parts = self.family.parts
        return [f for part, own_ema in ((parts.denoiser, ema), (parts.encoder, False))
                for f in self._weights_files(part, own_ema) if f.is_file()]

    def denoiser_state(self, ema: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The trained denoiser's state dict (kind full)."""
        self.require(ema)
        denoiser = self.family.parts.denoiser
        self._require_full(f"the {denoiser.label}'s weights")
        return self.part_state(denoiser, ema, dtype)

    def encoder_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """The trained encoder's state dict, or None when it was not trained (kind full)."""
        encoder = self.family.parts.encoder
        self._require_full(f"the {encoder.label}'s weights")
        return self.part_state(encoder, dtype=dtype) if self._holds(encoder) else None

    def adapters(self, ema: bool = False) -> tuple["Spec", dict, dict]:
        """(shapes, denoiser adapters, encoder adapters) of a LoRA checkpoint, in peft's layout."""
        self.require(ema)
        if self.kind != LORA:
            raise CheckpointError(f"{self.path} holds the trained models, not LoRA adapters.")
        return (lora.Spec.read(self.path / LORA), *lora.read(self.path / LORA, self.family.parts, ema))

    def _require_full(self, what: str) -> None:
        if self.kind != FULL:
            raise CheckpointError(f"{self.path} is a LoRA checkpoint: it holds adapters, not {what}.")

    def load_into(self, denoiser, encoder, ema: bool = False, scale: float = 1.0) -> None:
        """Put what this checkpoint holds into the run's base model's `denoiser` and `encoder`:
        the trained weights for kind full; for kind lora, its adapters at `scale`."""
        self.require(ema)
        parts = self.family.parts
        if self.kind == LORA:
            lora.load_into(self.path / LORA, denoiser, encoder, self.family, ema=ema, scale=scale)
            return
        self._load(denoiser, self.denoiser_state(ema), parts.denoiser.label)
        trained = self.encoder_state()
        if trained is not None:
            self._load(encoder, trained, parts.encoder.label)

    def _load(self, module, state: dict, what: str) -> None:
        try:
            load_strict(module, state)
        except RuntimeError as e:
            raise CheckpointError(f"{self.path}: its {what} does not fit this base model: was the run trained "
                                  f"from another one? ({str(e).splitlines()[0]})") from None


def name_of(optimizer) -> str:
    """The class that steps the weights (`AdamW8bit`, `Prodigy`, ...), through accelerate's wrapper."""
    return getattr(getattr(optimizer, "optimizer", optimizer), "dbnb_name", type(optimizer).__name__)


def load_strict(module: torch.nn.Module, state: dict) -> None:
    """load_state_dict(strict=True), except for `position_ids`: a buffer that some transformers
    versions save and others do not, and that no training changes."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    state.update({k: v for k, v in own.items() if k.endswith("position_ids") and k not in state})
    module.load_state_dict(state)



def damage(checkpoint: Path) -> str:
    """What is wrong with a checkpoint's files ("" when every one looks whole); cheap: headers
    and zip directories only."""
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix in (".safetensors", ".pt", ".bin"):
            try:
                weights.check(path)
            except weights.WeightFileError as e:
                return str(e)
    trainer = checkpoint / STATE / "trainer.json"
    if trainer.is_file():
        try:
            json.loads(trainer.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return f"{trainer} cannot be read ({e})."
    return ""


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- what the trainer writes into a checkpoint, and reads back on resume ------------------------

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def tensor_bytes(obj, dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors in `obj` (nested dicts / lists), as stored, or as `dtype` when given."""
    return sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in _tensors(obj))


def expected_size(run: RunFolder, tensors: int) -> int:
    """Bytes the next checkpoint will take: the last full one's real size once there is one,
    else `tensors` (the bytes of what it will hold); with a margin for headers, configs and the
    zip containers."""
    previous = run.resumable()
    if previous:
        return int(dir_size(previous[-1].path) * 1.02) + (1 << 20)
    return int(tensors * 1.05) + (1 << 20)


def disk_full(run: RunFolder, what: str, needed: int = 0):
    """The DiskFullError for a write that ran out of disk during training."""
    found = run.checkpoints()
    free = free_disk_bytes(run.root)
    return DiskFullError(
        f"Disk full at {run.root} while {what}: " + (f"need ~{format_bytes(needed)}, " if needed else "")
        + f"free {format_bytes(free)}. "
        + (f"The previous checkpoint {found[-1].path} is intact. " if found else "No checkpoint was saved yet. ")
        + free_space_advice(run), needed=needed, free=free, path=run.root)


def free_space_advice(run: RunFolder, shown: int = 5) -> str:
    """What a user can delete to go on after a full disk, with sizes, and how to go on. Not
    keep_last_n: it prunes only resume states, already pruned when the disk fills, while the
    older checkpoints' weights (kept for sampling and export) are what takes the room."""
    found = run.checkpoints()
    older = [f"{c.name} ({format_bytes(dir_size(c.path))})" for c in found[:-1]]
    samples = run.samples_root
    space = dir_size(samples) if samples.is_dir() else 0
    places = []
    if older:
        places.append(f"older checkpoint folders in {run.checkpoints_dir} you will not test or export: "
                      + ", ".join(older[:shown]) + (f" and {len(older) - shown} more" if len(older) > shown else "")
                      + f" (keep the newest, {found[-1].name}: resume goes on from it)")
    if space:
        places.append(f"the previews in {samples} ({format_bytes(space)})")
    places.append("other files on that disk (on Colab: empty Drive's trash too)")
    go_on = ("Then resume (notebook: resume = True; CLI: --resume latest)." if found
             else "Then start the run again (or choose another output_dir).")
    return "To make room, delete " + "; or ".join(places) + f". {go_on}"


def save_checkpoint(run: RunFolder, step: int, micro_step: int, denoiser, encoder, optimizer,
                    lr_scheduler, ema, config, family: Family) -> Path:
    """Checkpoint `step` of a run training `family`'s `denoiser` (and `encoder`) into `run`."""
    parts = family.parts
    if config.use_lora:  # only the adapters are saved: tens of MB, not a UNet
        trained = [lora.adapter_state(denoiser), lora.adapter_state(encoder)]
        held = tensor_bytes(trained) + tensor_bytes(ema.shadow_params if ema is not None else [])
    else:  # fp16 weights + the fp32 master copy
        trained = [state for _, _, _, state in trained_models(denoiser, encoder, ema, config, family)]
        held = tensor_bytes(trained, WEIGHTS_DTYPE) + tensor_bytes(trained, torch.float32)
    needed = expected_size(run, held + tensor_bytes(optimizer.state_dict()))
    check_free_space(run.root, needed, f"checkpoint step {step}", lambda: free_space_advice(run))

    run_id = run.run_id()

    def write(folder: Path):
        if config.use_lora:
            lora.save(folder / LORA, denoiser, encoder, lora.Spec.from_config(config),
                      lora.ema_state(ema.shadow_params, denoiser, encoder, parts) if ema is not None else None, parts)
        else:
            for name, part, module, state in trained_models(denoiser, encoder, ema, config, family):
                write_model(folder / name, module, state, WEIGHTS_DTYPE, part.file, part.members)
        write_state(folder, step, micro_step, optimizer, lr_scheduler, ema, config, run_id)
        if not config.use_lora:  # the fp32 master copy, pruned with the rest of the state
            for name, _, _, state in trained_models(denoiser, encoder, ema, config, family):
                write_tensors(folder / STATE / f"{name}.safetensors", state, torch.float32)

    try:
        path = run.write_checkpoint(step, write)  # a failed write leaves the previous checkpoints as they were
    except write_errors() as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise disk_full(run, f"saving checkpoint step {step}", needed) from None
    run.prune_states(config.keep_last_n)
    return path


def trained_models(denoiser, encoder, ema, config, family: Family) -> list[tuple[str, Part, torch.nn.Module, dict]]:
    """(folder name, the part, module whose config describes it, state dict) of each trained model
    of a full run: the denoiser, the encoder when trained, the EMA of the denoiser when kept (the
    denoiser's only, as SD 1.x's and diffusers' use_ema: a trained encoder has none)."""
    parts = family.parts
    models = [(parts.denoiser.name, parts.denoiser, denoiser, denoiser.state_dict())]
    if config.fine_tunes_text_encoder:
        models.append((parts.encoder.name, parts.encoder, encoder, encoder.state_dict()))
    if ema is not None:  # EMAModel follows denoiser.parameters() in order
        shadow = dict(zip((n for n, _ in denoiser.named_parameters()), ema.shadow_params))
        models.append((parts.denoiser.ema, parts.denoiser, denoiser,
                       {k: shadow.get(k, v) for k, v in denoiser.state_dict().items()}))
    return models


def write_model(folder: Path, module, state: dict, dtype: torch.dtype, file: str,
                members: tuple[str, ...] = ()) -> None:
    """A diffusers / transformers model folder (config + the safetensors `file`) holding `state`;
    for a ModuleDict of several models (`members`), a model folder of each in `folder`."""
    folder.mkdir()
    if members:
        for member in members:
            write_model(folder / member, module[member], under(state, member), dtype, file)
        return
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
    else:  # transformers
        module.config.save_pretrained(folder)
    write_tensors(folder / file, state, dtype)


def write_tensors(path: Path, state: dict, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file  # lazy: loads safetensors

    # On the CPU one tensor at a time: a GPU copy of a whole UNet at save time could run out of VRAM.
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


def write_state(folder: Path, step: int, micro_step: int, optimizer, lr_scheduler, ema, config, run_id) -> None:
    state = folder / STATE
    state.mkdir()
    torch.save(optimizer.state_dict(), state / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), state / "lr_scheduler.pt")
    if ema is not None:
        torch.save({k: v for k, v in ema.state_dict().items() if k != "shadow_params"}, state / "ema.pt")
    # trainer.json last: its presence is what marks a state as resumable
    (state / "trainer.json").write_text(json.dumps({"step": step, "micro_step": micro_step, "seed": config.seed,
                                                    "run_id": run_id, "run_name": config.run_name,
                                                    "optimizer": name_of(optimizer)}))


def load_checkpoint(checkpoint: Checkpoint, denoiser, encoder, ema, config) -> dict:
    """Weights (before accelerate wraps the models); returns trainer.json."""
    path, parts = checkpoint.path, checkpoint.family.parts
    if checkpoint.kind == LORA:
        denoiser_state, encoder_state = lora.read(path / LORA, parts)
        lora.set_adapter_state(denoiser, denoiser_state, path / LORA)
        if config.trains_text_encoder:
            lora.set_adapter_state(encoder, encoder_state, path / LORA)
        if ema is not None:
            load_ema_state(checkpoint, ema, lora.read_ema_shadow(path / LORA, denoiser, encoder, parts))
        return checkpoint.trainer_state()
    load_strict(denoiser, master_state(checkpoint, parts.denoiser.name))
    if config.fine_tunes_text_encoder:
        load_strict(encoder, master_state(checkpoint, parts.encoder.name))
    if ema is not None:
        shadow = master_state(checkpoint, parts.denoiser.ema)
        load_ema_state(checkpoint, ema, [shadow[n].float() for n, _ in denoiser.named_parameters()])
    return checkpoint.trainer_state()


def master_state(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of the part (or EMA) saved as `name` that a resume continues from: the
    state's master copy, or in a checkpoint written before there was one, the (then fp32)
    weights folder."""
    master = checkpoint.path / STATE / f"{name}.safetensors"
    if master.is_file():
        return weights.read_safetensors(master)
    parts = checkpoint.family.parts
    part = parts.encoder if name == parts.encoder.name else parts.denoiser  # the EMA's file is the denoiser's
    state = checkpoint.part_state(part, ema=name == part.ema)
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
        raise CheckpointError(f"resume {checkpoint.path}: its state has no fp32 master copy of {name} "
                              f"({master.name} is missing) and {checkpoint.path / name} holds half-precision "
                              "weights, from which a resume would not continue exactly. Resume from a complete "
                              "checkpoint, or start a new run_name.")
    return state


def load_ema_state(checkpoint: Checkpoint, ema, shadow: list[torch.Tensor]) -> None:
    ema_state = weights.read_pickle(checkpoint.path / STATE / "ema.pt")
    ema.load_state_dict({**ema_state, "shadow_params": shadow})


def load_optimizer_state(checkpoint: Checkpoint, optimizer, lr_scheduler) -> None:
    # Same settings can build another optimizer elsewhere (bitsandbytes or prodigyopt missing
    # there: the fallback); its state would not fit, or would fit and mean something else.
    saved, built = checkpoint.trainer_state().get("optimizer"), name_of(optimizer)
    if saved is not None and saved != built:
        raise CheckpointError(f"resume {checkpoint.path}: its optimizer state is {saved}'s, but here the same "
                             f"settings built {built} (see the warning above for what is missing). Resume where "
                             f"{saved} runs (install what the warning names), or start a new run_name.")
    optimizer.load_state_dict(weights.read_pickle(checkpoint.path / STATE / "optimizer.pt"))
    lr_scheduler.load_state_dict(weights.read_pickle(checkpoint.path / STATE / "lr_scheduler.pt"))


# Names that live elsewhere, still importable from here for dbnb/train and its tests until they
# import them from their homes (not plain imports: dbnb.run.folder imports this module).
_ELSEWHERE = {"RunFolder": "dbnb.run.folder", "TMP_PREFIX": "dbnb.run.folder", "RunInUseError": "dbnb.run.lock"}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
