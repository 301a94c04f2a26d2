"""The run folder: the contract between training and everything after it.

    <output_dir>/<run_name>/
      config.json                 the frozen config this run used
      checkpoints/step-000500/    unet/ [text_encoder/] [unet_ema/] + state/ (resume only)
      samples/step-000500/        preview PNGs + grid.png
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
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from dbnb import weights
from dbnb.errors import DbnbError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_PREFIX = ".tmp-"


# The lock's holder touches it this often; a lock not touched for STALE_AFTER_S belongs to a
# session that is gone (a Colab VM that was recycled has another host name and no pid to ask).
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class RunFolderError(DbnbError, RuntimeError):
    """The run folder is not in the state an action needs; the message says what to do."""


class RunInUseError(RunFolderError):
    """Another training holds the run folder's lock."""


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def for_config(cls, config) -> "RunFolder":
        return cls(Path(config.output_dir) / config.run_name)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / "train.jsonl"

    def samples_dir(self, step: int) -> Path:
        return self.root / "samples" / f"step-{step:06d}"

    def checkpoint_dir(self, step: int) -> Path:
        return self.root / "checkpoints" / f"step-{step:06d}"

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
        """config.json of a new run: its settings and a run id, which every checkpoint records
        so a checkpoint of another run is never resumed here."""
        run_id = uuid.uuid4().hex[:12]
        text = json.dumps({**config.to_dict(), "run_id": run_id}, indent=2, ensure_ascii=False)
        self.config_path.write_text(text + "\n", encoding="utf-8")
        return run_id

    def run_id(self) -> str | None:
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError):
            return None

    def create(self) -> None:
        for sub in ("checkpoints", "samples", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # --- reading --------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first. Temporary (half-written) folders are not listed."""
        folder = self.root / "checkpoints"
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def resumable(self) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in self.checkpoints() if (p / "state" / "trainer.json").is_file()]

    def resolve_resume(self, resume: str) -> Path:
        """`latest` → the newest checkpoint with a resume state; otherwise a checkpoint path."""
        if resume == "latest":
            found = self.resumable()
            if not found:
                raise RunFolderError(f"resume: {self.root} has no checkpoint with a resume state yet. Start "
                                     "without resuming (notebook: resume = False; command line: no --resume), "
                                     "or check output_dir / run_name.")
            newest = found[-1][1]
            problem = damage(newest)
            if problem:  # never fall back silently: the user decides to lose the newest steps
                earlier = next((p for _, p in reversed(found[:-1]) if not damage(p)), None)
                raise RunFolderError(
                    f"resume latest: the newest checkpoint {newest} is damaged, so nothing was loaded: "
                    f"{problem} " + (f"Resume from the previous complete one, {earlier.name}: --resume {earlier} "
                                     f"(or delete {newest} and resume latest again)." if earlier else
                                     "No earlier checkpoint with a resume state is complete: start a new run_name."))
            return newest
        path = Path(resume)
        if not (path / "state" / "trainer.json").is_file():
            raise RunFolderError(f"--resume {resume}: not a checkpoint folder with state/trainer.json "
                                 "(its resume state may have been pruned by keep_last_n).")
        if problem := damage(path):
            raise RunFolderError(f"--resume {resume}: this checkpoint is damaged, so nothing was loaded: {problem} "
                                 "Choose another checkpoint of the run.")
        self.check_owns(path)
        return path

    def check_owns(self, checkpoint: Path) -> None:
        """Refuse another run's checkpoint: resuming it here would mix two runs and overwrite
        this run's later steps. A checkpoint names its run by the run id in trainer.json;
        older ones without it must at least lie in this run's checkpoints/."""
        state = json.loads((checkpoint / "state" / "trainer.json").read_text(encoding="utf-8"))
        theirs, mine = state.get("run_id"), self.run_id()
        inside = checkpoint.resolve().parent == (self.root / "checkpoints").resolve()
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
        folder = self.root / "checkpoints"
        leftovers = [p for p in folder.glob(f"{TMP_PREFIX}*")] if folder.is_dir() else []
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return leftovers

    def prune_states(self, keep_last_n: int) -> list[Path]:
        """Drop resume states (optimizer etc., the bulk) of all but the newest `keep_last_n`;
        trained weights stay so every saved step can still be sampled and exported."""
        pruned = []
        for _, path in self.resumable()[:-keep_last_n]:
            shutil.rmtree(path / "state")
            pruned.append(path)
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


class RunLock:
    """train.lock: {pid, host, started}; its mtime is the holder's heartbeat."""

    def __init__(self, path: Path):
        self.path = path
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._made_root = False

    def acquire(self) -> None:
        self._made_root = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"Cannot write the run folder {self.path.parent}: {e.strerror or e}. "
                                 "Choose another output_dir (on Colab: is Drive still mounted?).") from None
        for _ in range(2):  # the second try follows taking over a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self._beat = threading.Thread(target=self._heartbeat, name="dbnb-run-lock", daemon=True)
            self._beat.start()
            return
        raise RunInUseError(f"{self.path.parent} was just taken by another training ({self.path}); "
                            "wait for it to finish or choose another run_name.")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # Drive briefly unavailable: the next beat tries again
                pass

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8") or "{}")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError):  # being written right now, or garbage
            holder, age = {}, time.time() - self.path.stat().st_mtime
        gone = _stale_reason(holder, age)
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}")
        if gone is None:
            raise RunInUseError(
                f"{self.path.parent} is in use by another training ({who}; lock file {self.path}). Two "
                "trainings in one run folder would mix their logs and checkpoints: wait for that one to "
                "finish or stop it, or choose another run_name. If that training is surely gone (its "
                f"session ended), delete {self.path}; it is taken over by itself "
                f"{STALE_AFTER_S / 60:.0f} minutes after its last heartbeat.")
        print(f"[dbnb] taking over the stale lock {self.path} ({who}): {gone}.", flush=True)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
            if self._made_root:  # a run refused before it wrote anything leaves no empty folder
                try:
                    self.path.parent.rmdir()
                except OSError:
                    pass


def _stale_reason(holder: dict, age: float) -> str | None:
    """Why a lock no longer guards anything, or None while its holder may still be training."""
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        return f"process {pid} is no longer running"
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age / 60:.0f} minutes"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def damage(checkpoint: Path) -> str:
    """What is wrong with a checkpoint's files ("" when every one looks whole); cheap: headers
    and zip directories only."""
    for path in sorted(checkpoint.rglob("*")):
        if path.suffix in (".safetensors", ".pt", ".bin"):
            try:
                weights.check(path)
            except weights.WeightFileError as e:
                return str(e)
    trainer = checkpoint / "state" / "trainer.json"
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


def expected_size(run: RunFolder, *parts) -> int:
    """Bytes the next checkpoint will take: the last full one's real size once there is one,
    else the tensors it will hold (weights, EMA, optimizer state); with a margin for headers,
    configs and the zip containers."""
    previous = run.resumable()
    if previous:
        return int(dir_size(previous[-1][1]) * 1.02) + (1 << 20)
    tensors = sum(t.numel() * t.element_size() for part in parts for t in _tensors(part))
    return int(tensors * 1.05) + (1 << 20)


def disk_full(run: RunFolder, what: str, needed: int = 0):
    """The DiskFullError for a write that ran out of disk during training."""
    from dbnb.env import DiskFullError, format_bytes, free_disk_bytes

    found = run.checkpoints()
    free = free_disk_bytes(run.root)
    return DiskFullError(
        f"Disk full at {run.root} while {what}: " + (f"need ~{format_bytes(needed)}, " if needed else "")
        + f"free {format_bytes(free)}. "
        + (f"The previous checkpoint {found[-1][1]} is intact. " if found else "No checkpoint was saved yet. ")
        + "Free some space (or lower keep_last_n, or choose another output_dir), then resume "
        "(notebook: resume = True; CLI: --resume latest).", needed=needed, free=free, path=run.root)


def save_checkpoint(run: RunFolder, step: int, micro_step: int, unet, text_encoder, optimizer,
                    lr_scheduler, ema, config) -> Path:
    from dbnb.env import DiskFullError, check_free_space, is_disk_full

    trained = [unet.state_dict()] + ([text_encoder.state_dict()] if config.train_text_encoder else [])
    needed = expected_size(run, *trained, ema.shadow_params if ema is not None else [], optimizer.state_dict())
    check_free_space(run.root, needed, f"checkpoint step {step}")

    run_id = run.run_id()

    def write(folder: Path):
        unet.save_pretrained(folder / "unet")
        if config.train_text_encoder:
            text_encoder.save_pretrained(folder / "text_encoder")
        if ema is not None:
            ema.save_pretrained(folder / "unet_ema")
        state = folder / "state"
        state.mkdir()
        torch.save(optimizer.state_dict(), state / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), state / "lr_scheduler.pt")
        if ema is not None:
            torch.save({k: v for k, v in ema.state_dict().items() if k != "shadow_params"}, state / "ema.pt")
        # trainer.json last: its presence is what marks a state as resumable
        (state / "trainer.json").write_text(json.dumps({"step": step, "micro_step": micro_step,
                                                        "seed": config.seed, "run_id": run_id,
                                                        "run_name": config.run_name}))

    try:
        path = run.write_checkpoint(step, write)  # a failed write leaves the previous checkpoints as they were
    except (OSError, RuntimeError) as e:
        if isinstance(e, DiskFullError) or not is_disk_full(e):
            raise
        raise disk_full(run, f"saving checkpoint step {step}", needed) from None
    run.prune_states(config.keep_last_n)
    return path


def load_checkpoint(path: Path, unet, text_encoder, ema, config) -> dict:
    """Weights (before accelerate wraps the models); returns trainer.json."""
    from diffusers import UNet2DConditionModel

    unet.load_state_dict(weights.read_safetensors(path / "unet" / "diffusion_pytorch_model.safetensors"))
    if config.train_text_encoder:
        text_encoder.load_state_dict(weights.read_safetensors(path / "text_encoder" / "model.safetensors"),
                                     strict=False)
    if ema is not None:
        shadow = UNet2DConditionModel.from_pretrained(path / "unet_ema")
        ema_state = weights.read_pickle(path / "state" / "ema.pt")
        ema.load_state_dict({**ema_state, "shadow_params": [p.detach() for p in shadow.parameters()]})
    return json.loads((path / "state" / "trainer.json").read_text())


def load_optimizer_state(path: Path, optimizer, lr_scheduler) -> None:
    optimizer.load_state_dict(weights.read_pickle(path / "state" / "optimizer.pt"))
    lr_scheduler.load_state_dict(weights.read_pickle(path / "state" / "lr_scheduler.pt"))
