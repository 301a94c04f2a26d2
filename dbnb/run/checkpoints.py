"""The run folder: the contract between training and everything after it.

    <output_dir>/<run_name>/
      config.json                 the frozen config this run used
      base_model.json             what the run started from: the base model's sources and fingerprint
      checkpoints/step-000500/    a Checkpoint: the trained models or LoRA adapters + state/ (resume only)
      samples/step-000500/        preview PNGs + grid.png
      tests/                      dbnb sample's test-prompt images, grid-0.png …, index.html (dbnb.evaluate.sample)
      exports/                    dbnb export's files when no other destination is given
      logs/train.jsonl            step, loss, lr, time
      train.lock                  while a training writes here: its pid, host, start time

A checkpoint folder appears only when complete: it is written under a temporary name and
renamed into place, so a kill at any moment never leaves one that resume would pick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dbnb.core import weights
from dbnb.run.lock import RunFolderError, RunInUseError, RunLock  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from dbnb.family.lora import Spec

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_PREFIX = ".tmp-"

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
            from dbnb.family import lora
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
        from dbnb.family import lora

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
            from dbnb.family import lora
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



class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def for_config(cls, config, run_name: str = "") -> "RunFolder":
        """<output_dir>/<run_name> of `config`, or of another run there (`run_name`, e.g. the
        run notebook 05 tests)."""
        return cls(Path(config.output_dir) / (run_name or config.run_name))

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / "train.jsonl"

    @property
    def samples_root(self) -> Path:
        return self.root / "samples"

    def samples_dir(self, step: int) -> Path:
        return self.samples_root / f"step-{step:06d}"

    def preview_grids(self) -> list[Path]:
        """The training previews' grids (dbnb.train.previews writes one per step), oldest first."""
        return sorted(self.samples_root.glob("step-*/grid.png"))

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step:06d}"

    @property
    def tests_dir(self) -> Path:
        """What dbnb sample makes: its layout inside is dbnb.evaluate.sample's, except the grids' names."""
        return self.root / "tests"

    # One grid per test prompt; its index fills the braces. The notebooks and the report find
    # the grids by this name, so dbnb.evaluate.sample writes and links them by it too.
    TEST_GRID = "grid-{}.png"

    def test_grid(self, prompt_index: int) -> Path:
        return self.tests_dir / self.TEST_GRID.format(prompt_index)

    def test_grids(self) -> list[Path]:
        return sorted(self.tests_dir.glob(self.TEST_GRID.format("*")))

    @property
    def exports_dir(self) -> Path:
        """Where dbnb export writes when no destination is given."""
        return self.root / "exports"

    @property
    def lock_path(self) -> Path:
        return self.root / "train.lock"

    @contextmanager
    def hold(self, is_main: bool = True):
        """Hold the run folder's lock for a training: taken before anything is written, so two
        trainings never mix their logs and checkpoints in one folder. A plain file created with
        O_EXCL, because Drive and network folders keep no OS locks. Only the main process of a
        multi-GPU run takes it (the others write nothing)."""
        if not is_main:
            yield
            return
        lock = RunLock(self.lock_path)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def write_config(self, config) -> str:
        """config.json of a new run: its settings, a run id, which every checkpoint records so a
        checkpoint of another run is never resumed here, and the dbnb that trains it (version and
        commit: the report's DBモデルハッシュ, as the seed's reports pin the extension's commit)."""
        from dbnb.core.versions import dbnb_version

        run_id = uuid.uuid4().hex[:12]
        text = json.dumps({**config.to_dict(), "run_id": run_id, "dbnb_version": dbnb_version()},
                          indent=2, ensure_ascii=False)
        self.config_path.write_text(text + "\n", encoding="utf-8")
        return run_id

    @property
    def base_path(self) -> Path:
        return self.root / "base_model.json"

    def record_base(self, config, parts: dict[str, str]) -> None:
        """What a new run starts from: the base model's settings and its fingerprint
        (dbnb.family.sd1.load.fingerprint), which resume compares by content."""
        record = {"pretrained_model_name_or_path": config.pretrained_model_name_or_path,
                  "pretrained_vae_name_or_path": config.pretrained_vae_name_or_path, "fingerprint": parts}
        self.base_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def check_base(self, config, parts: dict[str, str]) -> None:
        """Refuse to resume on another base model than the run started from: the checkpoint's
        trained weights would go on with another model's VAE and text encoder (or a LoRA on
        weights it was not trained on). The paths may differ (a copy, a new download): the
        content decides. Runs from before the record was kept are not checked."""
        try:
            record = json.loads(self.base_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        differ = [part for part, value in record.get("fingerprint", {}).items() if parts.get(part) != value]
        if not differ:
            return
        names = ("pretrained_model_name_or_path", "pretrained_vae_name_or_path")
        then = " with ".join(f"{n}={record.get(n)!r}" for n in names if record.get(n))
        now = " with ".join(f"{n}={getattr(config, n)!r}" for n in names if getattr(config, n))
        raise RunFolderError(
            f"resume: {self.root} started from {then}, but this config loads {now}, a different model "
            f"(its {', '.join(differ)} differ{'s' if len(differ) == 1 else ''} by content; a copy at another "
            "precision counts as different). Training on would mix the run's trained weights with another "
            f"model. Set {' and '.join(n for n in names if record.get(n) or getattr(config, n))} back to what "
            f"the run started from (recorded in {self.base_path}), or start a new run_name without resuming.")

    def saved_config(self) -> dict | None:
        """config.json as the run started (with its run id), or None where there is none yet."""
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def run_id(self) -> str | None:
        return (self.saved_config() or {}).get("run_id")

    def create(self) -> None:
        for folder in (self.checkpoints_dir, self.samples_root, self.log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)

    # --- reading --------------------------------------------------------------------------
    def checkpoints(self) -> list["Checkpoint"]:
        """Complete checkpoints, oldest first. Temporary (half-written) folders are not listed."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        found = [Checkpoint(int(m.group(1)), p) for p in folder.iterdir()
                 if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found, key=lambda c: c.step)

    def resumable(self) -> list["Checkpoint"]:
        return [c for c in self.checkpoints() if c.resumable]

    def _none_yet(self) -> CheckpointError:
        return CheckpointError(f"{self.root} has no checkpoints yet: train first (dbnb train), or check the run "
                               "folder (<output_dir>/<run_name>).")

    def pick(self, step: int | None) -> "Checkpoint":
        """The checkpoint at `step`; None: the newest."""
        found = self.checkpoints()
        if not found:
            raise self._none_yet()
        if step is None:
            return found[-1]
        for c in found:
            if c.step == step:
                return c
        raise CheckpointError(f"{self.root} has no checkpoint at step {step}; saved steps: "
                              f"{', '.join(str(c.step) for c in found)}.")

    def choose(self, steps: str, setting: str = "test_steps") -> list["Checkpoint"]:
        """The checkpoints named by `steps`: 'all', 'latest' or '1000,2000'."""
        found = self.checkpoints()
        if not found:
            raise self._none_yet()
        spec = steps.strip().lower()
        if spec in ("", "all"):
            return found
        if spec == "latest":
            return found[-1:]
        try:
            wanted = sorted({int(s) for s in spec.replace(" ", "").split(",") if s})
        except ValueError:
            raise CheckpointError(f"{setting}: {steps!r} is not 'all', 'latest' or steps like '1000,2000'.") from None
        by_step = {c.step: c for c in found}
        missing = [s for s in wanted if s not in by_step]
        if missing:
            raise CheckpointError(f"{setting}: no checkpoint at step {', '.join(map(str, missing))}; saved steps: "
                                  f"{', '.join(str(c.step) for c in found)}.")
        return [by_step[s] for s in wanted]

    def resolve_resume(self, resume: str) -> "Checkpoint":
        """`latest` → the newest checkpoint with a resume state; otherwise a checkpoint path."""
        if resume == "latest":
            found = self.resumable()
            if not found:
                raise RunFolderError(f"resume: {self.root} has no checkpoint with a resume state yet. Start "
                                     "without resuming (notebook: resume = False; command line: no --resume), "
                                     "or check output_dir / run_name.")
            newest = found[-1]
            problem = damage(newest.path)
            if problem:  # never fall back silently: the user decides to lose the newest steps
                earlier = next((c.path for c in reversed(found[:-1]) if not damage(c.path)), None)
                raise RunFolderError(
                    f"resume latest: the newest checkpoint {newest.path} is damaged, so nothing was loaded: "
                    f"{problem} " + (f"Resume from the previous complete one, {earlier.name}: --resume {earlier} "
                                     f"(or delete {newest.path} and resume latest again)." if earlier else
                                     "No earlier checkpoint with a resume state is complete: start a new run_name."))
            return newest
        path = Path(resume)
        found = Checkpoint.at(path)
        if found is None or not found.resumable:
            raise RunFolderError(f"--resume {resume}: not a checkpoint folder with state/trainer.json "
                                 "(its resume state may have been pruned by keep_last_n).")
        if problem := damage(path):
            raise RunFolderError(f"--resume {resume}: this checkpoint is damaged, so nothing was loaded: {problem} "
                                 "Choose another checkpoint of the run.")
        self.check_owns(path)
        return found

    def check_owns(self, checkpoint: Path) -> None:
        """Refuse another run's checkpoint: resuming it here would mix two runs and overwrite
        this run's later steps. A checkpoint names its run by the run id in trainer.json;
        older ones without it must at least lie in this run's checkpoints/."""
        state = json.loads((checkpoint / STATE / "trainer.json").read_text(encoding="utf-8"))
        theirs, mine = state.get("run_id"), self.run_id()
        inside = checkpoint.resolve().parent == self.checkpoints_dir.resolve()
        if (theirs and mine and theirs == mine) or (not (theirs and mine) and inside):
            return
        owner = checkpoint.resolve().parent.parent
        name = state.get("run_name", owner.name)
        raise RunFolderError(
            f"--resume {checkpoint}: that checkpoint belongs to run {name!r} ({owner}), not to {self.root}; "
            "resuming it here would mix the two runs and overwrite this run's later steps. Resume that run "
            f"(run_name={name} output_dir={owner.parent}), or start a new run_name without --resume.")

    # --- writing --------------------------------------------------------------------------
    def write_checkpoint(self, step: int, write) -> Path:
        """Call `write(folder)` on a temporary folder, then rename it to step-NNNNNN."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            if final.exists():  # the same step saved again (a cancel right after a save)
                old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def remove_partial(self) -> list[Path]:
        """Delete what a killed save left behind (never picked by resume, but it takes disk)."""
        folder = self.checkpoints_dir
        leftovers = [p for p in folder.glob(f"{TMP_PREFIX}*")] if folder.is_dir() else []
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return leftovers

    def prune_states(self, keep_last_n: int) -> list[Path]:
        """Drop resume states (optimizer etc., the bulk) of all but the newest `keep_last_n`;
        trained weights stay so every saved step can still be sampled and exported."""
        pruned = []
        for c in self.resumable()[:-keep_last_n]:
            shutil.rmtree(c.path / STATE)
            pruned.append(c.path)
        return pruned

    def truncate_log(self, step: int) -> None:
        """Forget log lines past `step`: a resumed run writes them again."""
        if not self.log_path.is_file():
            return
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.log_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


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
    from dbnb.core.disk import DiskFullError, format_bytes, free_disk_bytes

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
    from dbnb.core.disk import format_bytes

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
    from dbnb.core.disk import DiskFullError, check_free_space, is_disk_full, write_errors
    from dbnb.family import lora

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
    from safetensors.torch import save_file

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
        from dbnb.family import lora

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
