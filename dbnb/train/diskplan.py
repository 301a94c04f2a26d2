"""The disk a run will need, checked before its first step.

A run that fills its disk at step 2000 of 3000 has spent an hour of a Colab session for
nothing, yet every size is known at the start. Each save keeps the trained weights for good
(fp16 for a full run: `checkpoints.WEIGHTS_DTYPE`; the adapters for LoRA); the newest
`keep_last_n` saves also keep a resume state (fp32 master weights + the optimizer's state);
while a save is written one more state exists until the oldest is pruned; the run ends with an
fp16 export beside it (notebook 04's default). The plan adds these up from the loaded models'
real tensor sizes and compares the highest point with the free space of `output_dir`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dbnb.core.config import Config
from dbnb.core.disk import DiskFullError, format_bytes, free_disk_bytes
from dbnb.core.platform import shown
from dbnb.run.checkpoints import WEIGHTS_DTYPE, RunFolder, tensor_bytes


@dataclass(frozen=True)
class DiskPlan:
    """What a run (or the rest of a resumed one) writes from step `start` to `max_steps`: a
    checkpoint of `weights` bytes every `save_every_steps` and at the end, resume states of
    `state` bytes (at most `keep_last_n` kept, `states_now` already on disk), and one `export`."""
    weights: int
    state: int
    export: int
    max_steps: int
    save_every_steps: int
    keep_last_n: int
    start: int = 0
    states_now: int = 0

    @property
    def saves(self) -> int:
        return count_saves(self.start, self.max_steps, self.save_every_steps)

    def _states(self, kept: int) -> int:
        """States this run adds to those on disk when at most `kept` exist at once."""
        return max(0, min(kept, self.states_now + self.saves) - self.states_now)

    @property
    def during_last_save(self) -> int:
        return self.saves * self.weights + self._states(self.keep_last_n + 1) * self.state

    @property
    def at_the_end(self) -> int:
        return self.saves * self.weights + self._states(self.keep_last_n) * self.state + self.export

    @property
    def need(self) -> int:
        """The most the run's writes take at any moment."""
        return max(self.during_last_save, self.at_the_end)

    def line(self) -> str:
        states = self._states(self.keep_last_n + 1)
        return (f"{self.saves} save(s) × {format_bytes(self.weights)} of weights + {states} resume state(s) × "
                f"{format_bytes(self.state)} (the newest keep_last_n={self.keep_last_n}, one more while a save "
                f"replaces the oldest) + a {format_bytes(self.export)} export = up to {format_bytes(self.need)}")


def count_saves(start: int, max_steps: int, every: int) -> int:
    """Saves from step `start` (exclusive) to `max_steps`: every `every` steps, and at the end."""
    if max_steps <= start:
        return 0
    scheduled = (max_steps // every - start // every) if every else 0
    return scheduled + (0 if every and max_steps % every == 0 else 1)


def plan(config: Config, denoiser, encoder, autoencoder, optimizer_name: str, start: int, max_steps: int,
         run: RunFolder) -> DiskPlan:
    """The plan for `config` training a model of these parts (dbnb.family.base.Models' roles; the
    trained ones set up: adapters added, grads on)."""
    from dbnb.family import lora
    from dbnb.train.optimizers import state_bytes

    trained = [p for p in denoiser.parameters() if p.requires_grad]
    if config.trains_text_encoder:
        trained += [p for p in encoder.parameters() if p.requires_grad]
    ema = 2 if config.use_ema else 1
    if config.use_lora:  # adapters in fp32, as trained; the EMA's beside them
        weights = tensor_bytes(trained, torch.float32) * ema
        state = 0
        export = tensor_bytes(lora.trainable(denoiser, encoder), torch.float16)
    else:
        models = values(denoiser) * ema + (values(encoder) if config.fine_tunes_text_encoder else 0)
        weights = models * WEIGHTS_DTYPE.itemsize
        state = models * torch.float32.itemsize
        export = sum(values(part) for part in (denoiser, encoder, autoencoder)) * torch.float16.itemsize
    state += state_bytes(optimizer_name, trained)
    return DiskPlan(weights=weights, state=state, export=export, max_steps=max_steps,
                    save_every_steps=config.save_every_steps, keep_last_n=config.keep_last_n, start=start,
                    states_now=len(run.resumable()))


def values(part: torch.nn.Module) -> int:
    """The values (not bytes: the parts may sit in other dtypes) of a part's parameters."""
    return sum(p.numel() for p in part.parameters())


def check(run: RunFolder, config: Config, disk: DiskPlan) -> int:
    """Raise DiskFullError naming the figures and the settings that fit unless the run's writes
    fit the free space of its disk; return the free bytes."""
    free = free_disk_bytes(run.root)
    if disk.need <= free:
        return free
    raise DiskFullError(
        f"Disk plan for run {config.run_name!r}: {disk.line()}, but only {format_bytes(free)} is free at "
        f"{shown(run.root)}. {fitting(disk, free)} Or free space there, or choose an output_dir on a larger disk.",
        needed=disk.need, free=free, path=run.root)


def fitting(disk: DiskPlan, free: int) -> str:
    """The settings near the plan's whose writes fit `free`, said as a sentence."""
    from dataclasses import replace

    options = []
    if disk.keep_last_n > 1 and replace(disk, keep_last_n=1).need <= free:
        options.append("keep_last_n=1")
    every = disk.save_every_steps or disk.max_steps
    for wider in (every * factor for factor in range(2, 101)):
        if wider >= disk.max_steps:
            break
        if (fewer := replace(disk, save_every_steps=wider)).need <= free:
            options.append(f"save_every_steps={wider} ({fewer.saves} saves)")
            break
    if not options and disk.save_every_steps and replace(disk, save_every_steps=0).need <= free:
        options.append("save_every_steps=0 (one save, at the end)")
    if not options:
        return "Even one save at the end does not fit there."
    return "Settings that fit: " + ", or ".join(options) + "."
