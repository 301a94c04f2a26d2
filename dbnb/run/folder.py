"""The run folder: the contract between training and everything after it. Only RunFolder
spells its layout; sampling, scoring, export, the report and the notebooks ask it for paths.

    <output_dir>/<run_name>/
      config.json                 the settings the run started with, its run id and the dbnb that trained it;
                                  a resume keeps those that shape what it learns (the model and training)
      base_model.json             what the run started from: the base model's sources and fingerprint
      checkpoints/step-000500/    a Checkpoint (dbnb.run.checkpoints): the trained models or LoRA adapters
                                  + state/ (resume only)
      samples/step-000500/        preview PNGs + grid.png
      tests/                      dbnb sample's test-prompt images, grid-0.png …, index.html (dbnb.evaluate.sample)
      scores.csv, .json, .png     dbnb score's table, data and plot (dbnb.evaluate.score)
      exports/                    dbnb export's files when no other destination is given
      logs/train.jsonl            step, loss, lr, time
      train.lock                  while a training writes here: its pid, host, start time (dbnb.run.lock)

A checkpoint folder appears only when complete: it is written under a temporary name and
renamed into place, so a kill at any moment never leaves one that resume would pick.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from dbnb.core.versions import dbnb_version
from dbnb.family.base import Family, default, for_model, named
from dbnb.run.checkpoints import Checkpoint, CheckpointError, damage
from dbnb.run.lock import RunFolderError, RunLock

TMP_PREFIX = ".tmp-"


class RunFolder:
    """<output_dir>/<run_name>: where each of a run's files lives, and what is saved there."""

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

    def scores_file(self, suffix: str) -> Path:
        """What dbnb score writes (dbnb.evaluate.score): scores.csv, scores.json, scores.png."""
        return self.root / f"scores{suffix}"

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
        run_id = uuid.uuid4().hex[:12]
        text = json.dumps({**config.to_dict(), "run_id": run_id, "dbnb_version": dbnb_version()},
                          indent=2, ensure_ascii=False)
        self.config_path.write_text(text + "\n", encoding="utf-8")
        return run_id

    @property
    def base_path(self) -> Path:
        return self.root / "base_model.json"

    def record_base(self, config, parts: dict[str, str], family: str, sampling: dict | None = None) -> None:
        """What a new run starts from: the base model's settings, its `family` (by name), its
        fingerprint (the family's, dbnb.family.base.Models.base), which resume compares by content,
        and how it samples (`sampling`: its noise schedule's prediction_type, rescale_betas_zero_snr),
        which the report and the model card say (dbnb.ship.report)."""
        record = {"pretrained_model_name_or_path": config.pretrained_model_name_or_path,
                  "pretrained_vae_name_or_path": config.pretrained_vae_name_or_path, "family": family,
                  "fingerprint": parts, **({"sampling": sampling} if sampling else {})}
        self.base_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def check_base(self, config, parts: dict[str, str]) -> None:
        """Refuse to resume on another base model than the run started from: the checkpoint's
        trained weights would go on with another model's VAE and text encoder (or a LoRA on
        weights it was not trained on). The paths may differ (a copy, a new download): the
        content decides. Runs from before the record was kept are not checked."""
        record = self.base_record()
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

    def base_record(self) -> dict:
        """base_model.json as record_base wrote it; {} for a run from before it was kept."""
        try:
            return json.loads(self.base_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def saved_config(self) -> dict | None:
        """config.json as the run started (with its run id), or None where there is none yet."""
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def run_id(self) -> str | None:
        return (self.saved_config() or {}).get("run_id")

    @property
    def family(self) -> Family:
        """The family of the run's base model (its checkpoints' part names are that family's): as
        recorded when the run started; for runs from before the record named it, the family that
        recognizes the configured model."""
        name = self.base_record().get("family")
        if name:
            family = named(name)
            if family is None:
                raise RunFolderError(f"{self.root} was trained as a model of the family {name!r} (recorded in "
                                     f"{self.base_path}), which is not registered here: register it "
                                     "(dbnb.family.base.register) before opening the run.")
            return family
        source = (self.saved_config() or {}).get("pretrained_model_name_or_path")
        return for_model(source) if source else default()

    def create(self) -> None:
        for folder in (self.checkpoints_dir, self.samples_root, self.log_path.parent):
            folder.mkdir(parents=True, exist_ok=True)

    # --- reading --------------------------------------------------------------------------
    def checkpoints(self) -> list["Checkpoint"]:
        """Complete checkpoints, oldest first. Temporary (half-written) folders are not listed."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        family = self.family
        found = [c for p in folder.iterdir() if (c := Checkpoint.at(p, family))]
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
        found = Checkpoint.at(path, self.family)
        if found is None or not found.resumable:
            raise RunFolderError(f"--resume {resume}: not a checkpoint folder with state/trainer.json "
                                 "(its resume state may have been pruned by keep_last_n).")
        if problem := damage(path):
            raise RunFolderError(f"--resume {resume}: this checkpoint is damaged, so nothing was loaded: {problem} "
                                 "Choose another checkpoint of the run.")
        self.check_owns(found)
        return found

    def check_owns(self, found: Checkpoint) -> None:
        """Refuse another run's checkpoint: resuming it here would mix two runs and overwrite
        this run's later steps. A checkpoint names its run by the run id in trainer.json;
        older ones without it must at least lie in this run's checkpoints/."""
        checkpoint, state = found.path, found.trainer_state()
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
            c.drop_state()
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
