"""The run folder: the contract between training and everything after it.

    <output_dir>/<run_name>/
      config.json                 the frozen config this run used
      checkpoints/step-000500/    unet/ [text_encoder/] [unet_ema/] + state/ (resume only)
      samples/step-000500/        preview PNGs + grid.png
      logs/train.jsonl            step, loss, lr, time

A checkpoint folder appears only when complete: it is written under a temporary name and
renamed into place, so a kill at any moment never leaves one that resume would pick.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from dbnb.errors import DbnbError

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TMP_PREFIX = ".tmp-"


class RunFolderError(DbnbError, RuntimeError):
    """The run folder is not in the state an action needs; the message says what to do."""


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
            return found[-1][1]
        path = Path(resume)
        if not (path / "state" / "trainer.json").is_file():
            raise RunFolderError(f"--resume {resume}: not a checkpoint folder with state/trainer.json "
                                 "(its resume state may have been pruned by keep_last_n).")
        return path

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


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- what the trainer writes into a checkpoint, and reads back on resume ------------------------

def save_checkpoint(run: RunFolder, step: int, micro_step: int, unet, text_encoder, optimizer,
                    lr_scheduler, ema, config) -> Path:
    from dbnb.env import check_free_space

    trained = sum(p.numel() * 4 for p in unet.parameters())
    if config.train_text_encoder:
        trained += sum(p.numel() * 4 for p in text_encoder.parameters())
    # weights + EMA copy + Adam's two moments (an upper bound with 8-bit states)
    check_free_space(run.root, trained * (3 + (1 if ema else 0)), f"checkpoint step {step}")

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
                                                        "seed": config.seed}))

    path = run.write_checkpoint(step, write)
    run.prune_states(config.keep_last_n)
    return path


def load_checkpoint(path: Path, unet, text_encoder, ema, config) -> dict:
    """Weights (before accelerate wraps the models); returns trainer.json."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(path / "unet" / "diffusion_pytorch_model.safetensors"))
    if config.train_text_encoder:
        text_encoder.load_state_dict(load_file(path / "text_encoder" / "model.safetensors"), strict=False)
    if ema is not None:
        shadow = UNet2DConditionModel.from_pretrained(path / "unet_ema")
        ema_state = torch.load(path / "state" / "ema.pt", weights_only=True)
        ema.load_state_dict({**ema_state, "shadow_params": [p.detach() for p in shadow.parameters()]})
    return json.loads((path / "state" / "trainer.json").read_text())


def load_optimizer_state(path: Path, optimizer, lr_scheduler) -> None:
    optimizer.load_state_dict(torch.load(path / "state" / "optimizer.pt", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / "state" / "lr_scheduler.pt", weights_only=True))
