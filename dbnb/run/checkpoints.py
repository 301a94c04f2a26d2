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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dbnb.core import weights
from dbnb.core.disk import DiskFullError, check_free_space, format_bytes, free_disk_bytes, is_disk_full, write_errors
from dbnb.family import lora
from dbnb.run.lock import RunFolderError

if TYPE_CHECKING:
    from dbnb.family.lora import Spec
    from dbnb.run.folder import RunFolder

STEP_DIR = re.compile(r"^step-(\d{6,})$")

# A checkpoint folder's layout. Only this module spells it: everything else asks a Checkpoint.
#   full: unet/ [text_encoder/] [unet_ema/]   diffusers folders of the trained models, in fp16:
#         what test rendering and export use, kept for every save
#   lora: lora/ adapters.json unet.safetensors [text_encoder.safetensors] [ema.safetensors]
#   both: state/ optimizer.pt lr_scheduler.pt [ema.pt] trainer.json   (resume only; keep_last_n prunes it)
#   full: state/ unet.safetensors [text_encoder.safetensors] [unet_ema.safetensors]: the fp32 master
#         weights, so a resume continues exactly (checkpoints written before 2026-12-06 hold fp32
#         weights in unet/ and no master copy: a resume reads those)
UNET, TEXT_ENCODER, UNET_EMA, LORA, STATE = "unet", "text_encoder", "unet_ema", "lora", "state"
UNET_FILE, TEXT_ENCODER_FILE = "diffusion_pytorch_model.safetensors", "model.safetensors"
# Per-step weights: fp16 halves every save (SD 1.5's UNet: 1.72 GB against 3.44) and is what
# rendering and the fp16 export read anyway; training's fp32 master copy lives in the state.
WEIGHTS_DTYPE = torch.float16
FULL = "full"


class CheckpointError(RunFolderError):
    """A checkpoint lacks what was asked of it, or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved step of a run: what it holds and how it goes into a pipeline."""
    step: int
    path: Path

    @classmethod
    def at(cls, path: Path) -> "Checkpoint | None":
        m = STEP_DIR.match(Path(path).name)
        return cls(int(m.group(1)), Path(path)) if m and Path(path).is_dir() else None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def kind(self) -> str:
        """"full" (the trained models) or "lora" (adapters on the base model)."""
        return LORA if (self.path / LORA).is_dir() else FULL

    @property
    def parts(self) -> frozenset[str]:
        """What it holds: "unet", "text_encoder", "ema" (as weights, or as adapters for kind lora),
        and "state" when it can be resumed."""
        if self.kind == LORA:
            held = lora.held_parts(self.path / LORA)
        else:
            held = {n for n, sub, f in ((UNET, UNET, UNET_FILE), (TEXT_ENCODER, TEXT_ENCODER, TEXT_ENCODER_FILE),
                                        ("ema", UNET_EMA, UNET_FILE)) if (self.path / sub / f).is_file()}
        return frozenset(held | ({"state"} if self.resumable else set()))

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
        if "unet" not in self.parts:
            raise CheckpointError(f"{self.path} has no trained UNet: the checkpoint is incomplete; choose another "
                                  "step.")

    def files(self, ema: bool = False) -> list[Path]:
        """The weight files that `load_into(pipe, ema)` reads (to tell when they change)."""
        if self.kind == LORA:
            return sorted((self.path / LORA).glob("*"))
        unet = self.path / (UNET_EMA if ema else UNET) / UNET_FILE
        return [f for f in (unet, self.path / TEXT_ENCODER / TEXT_ENCODER_FILE) if f.is_file()]

    def unet_state(self, ema: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The trained UNet's diffusers state dict (kind full)."""
        self.require(ema)
        self._require_full("the UNet's weights")
        return weights.read_safetensors(self.path / (UNET_EMA if ema else UNET) / UNET_FILE, dtype)

    def text_encoder_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
        """The trained text encoder's state dict, or None when it was not trained (kind full)."""
        self._require_full("the text encoder's weights")
        file = self.path / TEXT_ENCODER / TEXT_ENCODER_FILE
        return weights.read_safetensors(file, dtype) if file.is_file() else None

    def adapters(self, ema: bool = False) -> tuple["Spec", dict, dict]:
        """(shapes, UNet adapters, text-encoder adapters) of a LoRA checkpoint, in peft's layout."""
        self.require(ema)
        if self.kind != LORA:
            raise CheckpointError(f"{self.path} holds the trained models, not LoRA adapters.")
        return (lora.Spec.read(self.path / LORA), *lora.read(self.path / LORA, ema))

    def _require_full(self, what: str) -> None:
        if self.kind != FULL:
            raise CheckpointError(f"{self.path} is a LoRA checkpoint: it holds adapters, not {what}.")

    def load_into(self, pipe, ema: bool = False, scale: float = 1.0) -> None:
        """Put what this checkpoint holds into `pipe` (a pipeline of the run's base model): the
        trained UNet / text encoder for kind full; for kind lora, its adapters at `scale`."""
        self.require(ema)
        if self.kind == LORA:
            lora.load_into(self.path / LORA, pipe, ema=ema, scale=scale)
            return
        self._load(pipe.unet, self.unet_state(ema), "UNet")
        text = self.text_encoder_state()
        if text is not None:
            self._load(pipe.text_encoder, text, "text encoder")

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


def save_checkpoint(run: RunFolder, step: int, micro_step: int, unet, text_encoder, optimizer,
                    lr_scheduler, ema, config) -> Path:
    if config.use_lora:  # only the adapters are saved: tens of MB, not a UNet
        trained = [lora.adapter_state(unet), lora.adapter_state(text_encoder)]
        held = tensor_bytes(trained) + tensor_bytes(ema.shadow_params if ema is not None else [])
    else:  # fp16 weights + the fp32 master copy
        trained = [state for _, _, state in trained_models(unet, text_encoder, ema, config)]
        held = tensor_bytes(trained, WEIGHTS_DTYPE) + tensor_bytes(trained, torch.float32)
    needed = expected_size(run, held + tensor_bytes(optimizer.state_dict()))
    check_free_space(run.root, needed, f"checkpoint step {step}", lambda: free_space_advice(run))

    run_id = run.run_id()

    def write(folder: Path):
        if config.use_lora:
            lora.save(folder / LORA, unet, text_encoder, lora.Spec.from_config(config),
                      lora.ema_state(ema.shadow_params, unet, text_encoder) if ema is not None else None)
        else:
            for name, module, state in trained_models(unet, text_encoder, ema, config):
                write_model(folder / name, module, state, WEIGHTS_DTYPE)
        write_state(folder, step, micro_step, optimizer, lr_scheduler, ema, config, run_id)
        if not config.use_lora:  # the fp32 master copy, pruned with the rest of the state
            for name, _, state in trained_models(unet, text_encoder, ema, config):
                write_tensors(folder / STATE / f"{name}.safetensors", state, torch.float32)

    try:
        path = run.write_checkpoint(step, write)  # a failed write leaves the previous checkpoints as they were
    except write_errors() as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise disk_full(run, f"saving checkpoint step {step}", needed) from None
    run.prune_states(config.keep_last_n)
    return path


def trained_models(unet, text_encoder, ema, config) -> list[tuple[str, torch.nn.Module, dict]]:
    """(folder name, module whose config describes it, state dict) of each trained model of a
    full run: the UNet, the text encoder when trained, the EMA of the UNet when kept."""
    models = [(UNET, unet, unet.state_dict())]
    if config.fine_tunes_text_encoder:
        models.append((TEXT_ENCODER, text_encoder, text_encoder.state_dict()))
    if ema is not None:  # EMAModel follows unet.parameters() in order
        shadow = dict(zip((n for n, _ in unet.named_parameters()), ema.shadow_params))
        models.append((UNET_EMA, unet, {k: shadow.get(k, v) for k, v in unet.state_dict().items()}))
    return models


def write_model(folder: Path, module, state: dict, dtype: torch.dtype) -> None:
    """A diffusers / transformers model folder (config + one safetensors file) holding `state`."""
    folder.mkdir()
    if hasattr(module, "save_config"):  # diffusers
        module.save_config(folder)
        write_tensors(folder / UNET_FILE, state, dtype)
    else:  # transformers
        module.config.save_pretrained(folder)
        write_tensors(folder / TEXT_ENCODER_FILE, state, dtype)


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


def load_checkpoint(checkpoint: Checkpoint, unet, text_encoder, ema, config) -> dict:
    """Weights (before accelerate wraps the models); returns trainer.json."""
    path = checkpoint.path
    if checkpoint.kind == LORA:
        unet_state, text_state = lora.read(path / LORA)
        lora.set_adapter_state(unet, unet_state, path / LORA)
        if config.trains_text_encoder:
            lora.set_adapter_state(text_encoder, text_state, path / LORA)
        if ema is not None:
            load_ema_state(checkpoint, ema, lora.read_ema_shadow(path / LORA, unet, text_encoder))
        return checkpoint.trainer_state()
    load_strict(unet, master_state(checkpoint, UNET))
    if config.fine_tunes_text_encoder:
        load_strict(text_encoder, master_state(checkpoint, TEXT_ENCODER))
    if ema is not None:
        shadow = master_state(checkpoint, UNET_EMA)
        load_ema_state(checkpoint, ema, [shadow[n].float() for n, _ in unet.named_parameters()])
    return checkpoint.trainer_state()


def master_state(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    """The fp32 weights a resume continues from: the state's master copy, or in a checkpoint
    written before there was one, the (then fp32) weights folder."""
    master = checkpoint.path / STATE / f"{name}.safetensors"
    if master.is_file():
        return weights.read_safetensors(master)
    folder = checkpoint.path / name
    file = folder / (TEXT_ENCODER_FILE if name == TEXT_ENCODER else UNET_FILE)
    state = weights.read_safetensors(file)
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
        raise CheckpointError(f"resume {checkpoint.path}: its state has no fp32 master copy of {name} "
                              f"({master.name} is missing) and {file} holds half-precision weights, from which a "
                              "resume would not continue exactly. Resume from a complete checkpoint, or start a "
                              "new run_name.")
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
