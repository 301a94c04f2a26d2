"""DreamBooth fine-tuning: one training loop, read top to bottom.

`train(config)` runs the whole story: check the settings against this machine, open the run
folder, load the base model (through its family, dbnb.family.base: the loop works on the roles
denoiser / encoder / autoencoder, never on a family's components), read the images, set up the
memory options and optimizer, resume if asked, then loop — loss, backward, clip, step, EMA, log, preview, save — and save
once more at the end or on cancel. `accelerate launch -m dbnb train ...` runs the same code
on several GPUs.

Randomness that shapes the result (data order, flips, noise, timesteps) is derived from
(seed, step), never drawn from a global RNG (dbnb.data.batches), so a run resumed after a lost
session computes exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dbnb.core.config import BLANK_CLASS_IMAGES, FIELDS, Config, ConfigError, check_schedule, class_word_warning
from dbnb.core.disk import format_bytes, is_disk_full
from dbnb.core.errors import DbnbError
from dbnb.core.hardware import has_bf16
from dbnb.core.platform import shown
from dbnb.core.precision import mixed_dtype
from dbnb.data.batches import (Batches, cache_latents, dropout_seed, epoch_length, gather_examples, next_batch,
                               read_images)
from dbnb.data.buckets import main_bucket
from dbnb.data.textcache import cache_text_embeddings
from dbnb.family import lora
from dbnb.family.base import Family, Models, family_of
from dbnb.run.checkpoints import (Checkpoint, RunFolder, RunFolderError, disk_full, load_checkpoint,
                                  load_optimizer_state, name_of, save_checkpoint)
from dbnb.train import diskplan, divergence, optimizers
from dbnb.train.loss import diffusion_loss
from dbnb.train.memory import apply_memory_profile, memory_advice
from dbnb.train.previews import warn_many_previews, write_previews
from dbnb.train.process import cancel_on_signal, forget_accelerator_state
from dbnb.train.reproducible import backward_threads, deterministic_mode


class TrainingError(DbnbError, RuntimeError):
    """Training stopped; the message says why and what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    max_steps: int
    checkpoints: list[Path]
    cancelled: bool


# --- machine and settings --------------------------------------------------------------------

def check_machine(config: Config, device: torch.device) -> None:
    if device.type == "cpu" and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU and this machine has none. "
                          "Set mixed_precision=no to train on the CPU (tiny models only).")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not has_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"mixed_precision=bf16: {torch.cuda.get_device_name(device)} (compute {major}.{minor}) "
                          "has no native bf16, which needs compute 8.0 (A100, L4, RTX 30xx or newer). "
                          "Use mixed_precision=fp16.")


def total_steps(config: Config, epoch_len: int, world: int) -> int:
    if config.num_train_epochs > 0:
        per_epoch = math.ceil(epoch_len / (config.train_batch_size * world * config.gradient_accumulation_steps))
        return per_epoch * config.num_train_epochs
    return config.max_train_steps


def check_resume_config(run: RunFolder, config: Config) -> None:
    """Only the settings a run freezes (Config.frozen: model, training) are compared, never prep, class-image
    making or tests. A resume may change how the run is trained (memory savers, precision, attention, saving,
    previews), said in one line; not what it learns (the fields marked `learns`)."""
    saved, now = run.saved_config() or {}, config.frozen()
    changed = [k for k in now if k in saved and saved[k] != now[k]]
    learnt = [k for k in changed if FIELDS[k].metadata["learns"]]
    if learnt:
        raise ConfigError(f"Resuming {run.root} with settings that change what it learns: "
                          + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in learnt)
                          + f" (saved in {run.config_path}). Set them back to resume, or start a new run_name.")
    if changed:
        print("[dbnb] resuming with changed settings: " + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed),
              flush=True)


def resolve_class_count(config: Config) -> Config:
    """num_class_images=0 with transparent / black class images means the seed's 10x the instance
    pictures (`dbnb.prep.classimages.wanted_class_images`): the count is written into the run's config,
    so a resume, the report and the class-image check all read the number used."""
    if not (config.with_prior_preservation and config.num_class_images == 0
            and config.class_images_mode in BLANK_CLASS_IMAGES and not config.concepts_list):
        return config
    from dbnb.prep.classimages import wanted_class_images

    wanted = wanted_class_images(config)
    if int(os.environ.get("RANK", "0")) == 0:  # said once, not by every DDP worker
        print(f"[dbnb] num_class_images=0 with class_images_mode={config.class_images_mode}: {wanted}, 10x the "
              f"instance pictures (the seed's rule).", flush=True)
    return config.replace(num_class_images=wanted)


def resume_message(done: int, max_steps: int, config: Config) -> str:
    """What a resume does, said where it starts: dbnb counts both settings from step 0 of the run,
    where the webui extension counts them from the stop (the guide: 「前回終了した地点から『設定したステップ分』」,
    「一度中断すると終了した地点が基準になる」)."""
    every = config.save_every_steps
    saves = (f"saves stay at multiples of save_every_steps={every} counted from step 0 (next at step "
             f"{min((done // every + 1) * every, max_steps)}), not from the stop" if every
             else "one save at the end (save_every_steps=0)")
    total = (f"num_train_epochs={config.num_train_epochs} ({max_steps} steps)" if config.num_train_epochs > 0
             else f"max_train_steps={max_steps}")
    return (f"[dbnb] resuming at step {done}: {total} is the total of the whole run, so {max_steps - done} steps "
            f"are left, not {max_steps} more as the webui extension would train (to train N more, set "
            f"max_train_steps={done} + N); {saves}. / 再開: ステップ {done} から {max_steps} まで（残り "
            f"{max_steps - done}）。max_train_steps は合計で、拡張機能のように『設定したステップ分』追加では"
            f"ありません。保存間隔も中断地点ではなくステップ 0 から数えます。")


def check_steps_left(checkpoint: Checkpoint, max_steps: int, config: Config) -> None:
    done = checkpoint.trainer_state()["step"]
    if done >= max_steps:
        what = (f"num_train_epochs={config.num_train_epochs} ({max_steps} steps)" if config.num_train_epochs > 0
                else f"max_train_steps={max_steps}")
        raise TrainingError(f"Resuming {checkpoint.path}: the run is already at step {done}, "
                            + ("which is" if done == max_steps else "past") + f" {what}; nothing to train. "
                            "Raise it to train further, or sample / export the run as it is.")


# --- the run ---------------------------------------------------------------------------------------

def open_run(config: Config, resume: str | None, is_main: bool) -> tuple[RunFolder, Checkpoint | None]:
    run = RunFolder.for_config(config)
    resume_from = run.resolve_resume(resume) if resume else None
    if resume_from is not None:
        check_resume_config(run, config)
    elif run.checkpoints():
        raise RunFolderError(f"run {config.run_name!r} ({shown(run.root)}) already has checkpoints: continue it "
                             "(notebook: resume = True; command line: --resume latest), or choose another "
                             "run_name for a new run.")
    if is_main:
        run.create()
        run.remove_partial()
        if resume_from is None:
            run.write_config(config)
    return run, resume_from


@dataclass(kw_only=True)
class Session:
    """What the loop works on, set up once by `setup`."""
    config: Config
    accelerator: object
    run: RunFolder
    family: Family
    models: Models             # as the family loaded them (denoiser / encoder unwrapped)
    denoiser: torch.nn.Module  # as accelerate prepared them
    encoder: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    ema: object | None
    batches: Batches
    max_steps: int
    weight_dtype: torch.dtype
    step: int = 0
    micro_step: int = 0
    stop_asked: dict | None = None   # cancel_on_signal's flag: asked of this process
    cancelled: bool = False          # agreed by every process (see agree_on_stops)


def train(config: Config, resume: str | None = None, progress: bool = True, on_step=None) -> TrainResult:
    """Train (or resume) the run of `config`. `on_step(record)` is called on the main process
    after every step with the log record (+ `preview`: the grid written at this step)."""
    # memory_profile=auto: settings from the GPU's VRAM; a resumed run keeps those it learns with.
    config = apply_memory_profile(config, resumed=RunFolder.for_config(config).saved_config() if resume else None)
    config = resolve_class_count(config)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_machine(config, device)
    with deterministic_mode(config.deterministic, device):  # before CUDA starts: cuBLAS reads its setting then
        return train_in_mode(config, resume, progress, on_step)


def train_in_mode(config: Config, resume: str | None, progress: bool, on_step) -> TrainResult:
    from accelerate import Accelerator

    # 1. Where we run: accelerate decides the device and the processes (one, or DDP).
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available())
    try:
        if accelerator.is_main_process and (said := class_word_warning(config)):
            warnings.warn(said, stacklevel=2)
        examples = gather_examples(config)
        # Before the run folder and the model: a schedule that cannot run would fail at the last step;
        # previews that would hold training up are said while the user can still stop and change them.
        steps = total_steps(config, epoch_length(config, examples), accelerator.num_processes)
        check_schedule(config, steps)
        warn_many_previews(config, steps)
        with RunFolder.for_config(config).hold(accelerator.is_main_process):
            session = setup(config, accelerator, resume, examples, progress)
            return loop(session, progress, on_step)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            forget_accelerator_state()


def setup(config: Config, accelerator, resume: str | None, examples=None, progress: bool = True) -> Session:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = mixed_dtype(accelerator.mixed_precision)

    if config.optimizer_in_backward:
        from dbnb.train.inbackward import check_supported
        check_supported(config, world)

    # 2. The run folder: a new one, or the one being resumed.
    run, resume_from = open_run(config, resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    # 3. Base model and training images.
    family = family_of(config)
    models = family.load(config, device, weight_dtype)
    if resume_from is not None:
        run.check_base(config, models.base)
    elif accelerator.is_main_process:
        schedule = models.noise_scheduler.config
        run.record_base(config, models.base, family.name,
                        {"prediction_type": schedule.get("prediction_type", "epsilon"),
                         "rescale_betas_zero_snr": bool(schedule.get("rescale_betas_zero_snr", False))})
    denoiser, encoder = models.denoiser, models.encoder
    batches = read_images(config, models.tokenizers, examples)
    max_steps = total_steps(config, batches.epoch_len, world)
    if resume_from is not None:
        check_steps_left(resume_from, max_steps, config)
        if accelerator.is_main_process:
            print(resume_message(resume_from.trainer_state()["step"], max_steps, config), flush=True)

    # 4. Optimizer, LR schedule, EMA — then the saved state when resuming.
    optimizer = optimizers.build(config, denoiser, encoder, world, device, encoders=family.parts.encoder.members)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    # foreach: one fused update over all tensors per step, not a kernel launch per tensor.
    if not config.use_ema:
        ema = None
    elif config.use_lora:  # the EMA of the adapters, saved beside them
        ema = EMAModel(lora.trainable(denoiser, encoder), decay=config.ema_decay, foreach=True)
    else:
        ema = EMAModel(denoiser.parameters(), decay=config.ema_decay, model_cls=type(denoiser),
                       model_config=denoiser.config, foreach=True)
    state = load_checkpoint(resume_from, denoiser, encoder, ema, config) if resume_from else {}
    # Every process on its own: each asks the same disk, so all stop here or none does.
    disk = diskplan.plan(config, models.denoiser, models.encoder, models.autoencoder, name_of(optimizer),
                         state.get("step", 0), max_steps, run)
    free = diskplan.check(run, config, disk)
    if accelerator.is_main_process:
        print(f"[dbnb] disk plan: {disk.line()}; {format_bytes(free)} free", flush=True)
    # An optimizer that steps inside backward gains nothing from accelerate's wrapper.
    parts = [denoiser] + ([encoder] if config.trains_text_encoder else []) \
        + ([] if config.optimizer_in_backward else [optimizer])
    prepared = accelerator.prepare(*parts)
    prepared = list(prepared) if len(parts) > 1 else [prepared]  # one object comes back bare
    denoiser = prepared.pop(0)
    encoder = prepared.pop(0) if config.trains_text_encoder else encoder
    optimizer = prepared.pop(0) if prepared else optimizer
    if resume_from is not None:
        load_optimizer_state(resume_from, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(device)

    # 5. Latents once, so the autoencoder can leave the GPU (flipped copies too when hflip is on).
    if config.cache_latents:
        batches.latents = cache_latents(batches, models.autoencoder, config.hflip, family)
        models.autoencoder.to("cpu")
        for images in (batches.instance, batches.klass):  # their latents are all the loop reads
            if images is not None:
                images.drop_pictures()
    # 6. Prompts once too (frozen encoders), so the text encoders can leave the GPU. Previews still
    # render with them: preview_pipeline brings every parked part to the denoiser's device and back,
    # one way to render for every family, at a copy each way per preview.
    if config.cache_text_embeddings:
        batches.text = cache_text_embeddings(batches, models.encoder, family, config.caption_dropout_rate > 0,
                                             progress and accelerator.is_main_process, config.clip_skip)
        models.encoder.to("cpu")
    if accelerator.is_main_process:
        run.truncate_log(state.get("step", 0))
    return Session(config=config, accelerator=accelerator, run=run, family=family, models=models,
                   denoiser=denoiser, encoder=encoder, optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
                   batches=batches, max_steps=max_steps, weight_dtype=weight_dtype, step=state.get("step", 0),
                   micro_step=state.get("micro_step", 0))


def loop(s: Session, progress: bool, on_step=None) -> TrainResult:
    from dbnb.core.progress import bar as tqdm

    # 7. The loop: one optimizer step per pass; save on schedule, on cancel and at the end.
    acc, config = s.accelerator, s.config
    if acc.is_main_process:
        print(f"[dbnb] run folder {shown(s.run.root)}: {len(s.batches.instance)} instance images"
              + (f", {len(s.batches.klass)} class images" if s.batches.klass else "")
              + f", steps {s.step} → {s.max_steps}, device {acc.device}, {acc.num_processes} process(es)", flush=True)
    saved, cancelled, started = [], False, time.time()
    bar = tqdm(total=s.max_steps, initial=s.step, disable=not (progress and acc.is_main_process),
               desc="training", unit="step", dynamic_ncols=True)
    s.denoiser.train()
    with cancel_on_signal() as flag:
        s.stop_asked = flag
        try:
            while s.step < s.max_steps and not cancelled:
                loss, grad_norm = optimizer_step(s)
                lr = s.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                cancelled = s.cancelled  # every process stops at the same step, or one waits forever
                if acc.is_main_process:
                    record = {"step": s.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "time": round(time.time() - started, 3)}
                    s.run.append_log(record)
                    if config.sample_every_steps and s.step % config.sample_every_steps == 0:
                        record["preview"] = str(write_previews(s.run, s.step, s.family, s.models,
                                                               acc.unwrap_model(s.denoiser), config,
                                                               preview_size(s.batches)))
                    if on_step is not None:
                        on_step({**record, "max_steps": s.max_steps, "last": cancelled or s.step == s.max_steps})
                due = config.save_every_steps and s.step % config.save_every_steps == 0
                if due or cancelled or s.step == s.max_steps:
                    if bad := non_finite_part(s):
                        raise diverged(s, f"A value in the {bad}", "inf or NaN", at=s.step)
                    if acc.is_main_process:
                        saved.append(save_checkpoint(s.run, s.step, s.micro_step, acc.unwrap_model(s.denoiser),
                                                     acc.unwrap_model(s.encoder), s.optimizer,
                                                     s.lr_scheduler, s.ema, config, s.family))
                    acc.wait_for_everyone()
        except KeyboardInterrupt:
            if not flag["cancel"]:  # not ours (a notebook's interrupt outside the handler): as it was
                raise
            found = s.run.checkpoints()
            raise TrainingError(f"Stopped at step {s.step} without saving (Ctrl-C twice); last checkpoint: "
                                f"{found[-1].path if found else 'none'}.") from None
        except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError, by the name torch < 2.5 has too
            raise TrainingError(f"Out of GPU memory at step {s.step + 1}. {memory_advice(config)}") from e
        except OSError as e:  # the log or a preview, written every few steps
            if isinstance(e, DbnbError) or not is_disk_full(e):
                raise
            raise disk_full(s.run, f"writing step {s.step}'s log and previews") from None
        finally:
            bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        print(f"[dbnb] {'cancelled' if cancelled else 'finished'} at step {s.step}/{s.max_steps}; "
              f"checkpoints in {shown(s.run.root / 'checkpoints')}", flush=True)
    return TrainResult(s.run.root, s.step, s.max_steps, saved, cancelled)


def preview_size(batches: Batches) -> tuple[int, int] | None:
    """With bucketing, previews render at the bucket most pictures train at (width, height)."""
    return main_bucket(batches.plan) if batches.plan is not None else None


def optimizer_step(s: Session) -> tuple[float, float | None]:
    """Micro-batches until the optimizer has stepped once; returns the last loss and the
    pre-clip gradient norm. Both, and the stop flags, reach the host in one read per optimizer
    step, just before it: on a GPU each read waits for all queued work, so one per micro-step
    would leave the GPU idle while Python prepares the next."""
    acc, config = s.accelerator, s.config
    rank, world = acc.process_index, acc.num_processes
    train_te = config.trains_text_encoder and s.step < int(config.stop_text_encoder * s.max_steps)
    # A frozen text encoder runs outside DDP, which would otherwise wait for its gradients.
    encoder = s.encoder if train_te else acc.unwrap_model(s.encoder)
    encoder.train(train_te)
    tracked = None  # the first non-finite loss of this step, else the last loss (on the device)
    while True:
        with acc.accumulate(s.denoiser):
            batch = next_batch(s.batches, s.micro_step, config, rank, world, s.models.autoencoder, s.family)
            if config.use_lora and config.lora_dropout:  # peft's dropout draws from the global RNG
                torch.manual_seed(dropout_seed(config.seed, s.micro_step, rank))
            loss = diffusion_loss(s.denoiser, encoder, s.models.noise_scheduler, batch, config, family=s.family,
                                  scaling_factor=s.models.latent_scale, device=acc.device, encode_with_grad=train_te)
            tracked = loss.detach() if tracked is None else torch.where(torch.isfinite(tracked), loss.detach(),
                                                                         tracked)
            # A non-finite loss is found below, before the step: its gradients are never applied
            # (with optimizer_in_backward they are, but the run stops before any save).
            with backward_threads(config.deterministic, acc.device):
                acc.backward(loss)
            if acc.sync_gradients:
                if config.optimizer_in_backward:
                    s.optimizer.step()  # a no-op (the hooks stepped) that completes their gradient norm
                    norm = s.optimizer.grad_norm_tensor
                else:
                    norm = divergence.gradient_norm(acc, s.optimizer, config.max_grad_norm)
                # before the step, so the weights in memory stay the last good ones
                last_loss, grad_norm = agree_on_stops(s, tracked, norm)
            if not config.optimizer_in_backward:
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
        s.micro_step += 1
        if acc.sync_gradients:
            break
    s.lr_scheduler.step()
    s.step += 1
    if s.ema is not None:
        s.ema.step(trained_parameters(s))
    return last_loss, grad_norm


def agree_on_stops(s: Session, tracked: torch.Tensor, norm: torch.Tensor | None) -> tuple[float, float | None]:
    """(loss, gradient norm) of this step as numbers, or the divergence error; notes in
    s.cancelled whether a stop was asked of any process. Whether the loss is inf / NaN anywhere
    is decided by all processes together, once per optimizer step: a process that stopped or
    raised alone would leave the others waiting in the next all-reduce for good."""
    acc = s.accelerator
    asked = bool(s.stop_asked and s.stop_asked["cancel"])
    flags = torch.stack([(~torch.isfinite(tracked)).float(), torch.full((), float(asked), device=tracked.device)])
    if acc.num_processes > 1:
        flags = acc.reduce(flags, reduction="sum")
    measured = (norm if norm is not None else torch.zeros(())).to(flags.device, torch.float32)
    bad, cancel, loss, grad_norm = torch.cat([flags, tracked.float().reshape(1), measured.reshape(1)]).tolist()
    s.cancelled = s.cancelled or cancel > 0
    if bad:
        raise diverged(s, "Loss", loss if not math.isfinite(loss) else "inf or NaN on another process")
    grad_norm = None if norm is None else grad_norm
    # Under fp16's loss scaling an inf norm is routine: the scaler skips that step.
    if grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None:
        raise diverged(s, "The gradient norm", grad_norm)
    return loss, grad_norm


def trained_parameters(s: Session) -> list[torch.nn.Parameter]:
    """What the EMA follows: the denoiser, or with use_lora every adapter."""
    denoiser = s.accelerator.unwrap_model(s.denoiser)
    if s.config.use_lora:
        return lora.trainable(denoiser, s.accelerator.unwrap_model(s.encoder))
    return list(denoiser.parameters())


def non_finite_part(s: Session) -> str:
    """Which trained tensors hold an inf or NaN ("" when none): checked before every save."""
    acc = s.accelerator
    denoiser, encoder = acc.unwrap_model(s.denoiser), acc.unwrap_model(s.encoder)
    named = s.family.parts
    parts = {f"{named.denoiser.label} weights": [p for p in denoiser.parameters() if p.requires_grad]}
    if s.config.trains_text_encoder:
        parts[f"{named.encoder.label} weights"] = [p for p in encoder.parameters() if p.requires_grad]
    if s.ema is not None:
        parts["EMA weights"] = list(s.ema.shadow_params)
    parts["optimizer state"] = divergence.optimizer_tensors(s.optimizer)
    return divergence.first_non_finite(parts)


def diverged(s: Session, what: str, value, at: int | None = None) -> TrainingError:
    return TrainingError(divergence.message(what, value, at or s.step + 1, s.step, s.run.checkpoints(),
                                            s.config.learning_rate))
