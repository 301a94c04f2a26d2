"""DreamBooth fine-tuning of Stable Diffusion 1.x: one training loop, read top to bottom.

`train(config)` runs the whole story: check the settings against this machine, open the run
folder, load the base model, read the images, set up the memory options and optimizer,
resume if asked, then loop — loss, backward, clip, step, EMA, log, preview, save — and save
once more at the end or on cancel. `accelerate launch -m dbnb train ...` runs the same code
on several GPUs.

Randomness that shapes the result (data order, flips, noise, timesteps) is derived from
(seed, step), never drawn from a global RNG, so a run resumed after a lost session computes
exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import json
import math
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dbnb.errors import DbnbError
from dbnb import data, divergence, lora, optimizers
from dbnb.checkpoints import (Checkpoint, RunFolder, RunFolderError, disk_full, load_checkpoint, load_optimizer_state,
                              save_checkpoint)
from dbnb.config import FIELDS, Config, ConfigError
from dbnb.env import shown
from dbnb.memory import apply_memory_profile
from dbnb.env import is_disk_full

# Settings that may differ between a run and its resumption: they change what is saved or
# shown, or extend the run, not what has been learnt so far.
RESUME_MAY_CHANGE = {"max_train_steps", "num_train_epochs", "save_every_steps", "sample_every_steps",
                     "keep_last_n", "sample_prompts", "sample_negative_prompt", "num_samples",
                     "sample_seed", "sample_guidance_scale", "sample_steps", "output_dir",
                     "pretrained_model_name_or_path", "pretrained_vae_name_or_path"}


class TrainingError(DbnbError, RuntimeError):
    """Training stopped; the message says why and what to change."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    max_steps: int
    checkpoints: list[Path]
    cancelled: bool


# --- randomness derived from (seed, step) ----------------------------------------------------

def step_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 64 + rank)


def caption_generator(seed: int, micro_step: int, rank: int) -> torch.Generator:
    """Caption shuffling / dropout draw from their own stream, so turning them on leaves the
    flips, noise and timesteps of every step as they were."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + micro_step) * 64 + rank) ^ (1 << 62))


def dropout_seed(seed: int, micro_step: int, rank: int) -> int:
    return ((seed * 1_000_003 + micro_step) * 64 + rank) ^ (1 << 61)


# --- machine and settings --------------------------------------------------------------------

def check_machine(config: Config, device: torch.device) -> None:
    if device.type == "cpu" and config.mixed_precision == "fp16":
        raise ConfigError("mixed_precision: fp16 needs a CUDA GPU and this machine has none. "
                          "Set mixed_precision=no to train on the CPU (tiny models only).")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision: this GPU has no bf16 (T4, V100, ...). Use mixed_precision=fp16.")


def total_steps(config: Config, epoch_len: int, world: int) -> int:
    if config.num_train_epochs > 0:
        per_epoch = math.ceil(epoch_len / (config.train_batch_size * world * config.gradient_accumulation_steps))
        return per_epoch * config.num_train_epochs
    return config.max_train_steps


def check_resume_config(run: RunFolder, config: Config) -> None:
    saved = json.loads(run.config_path.read_text(encoding="utf-8"))
    changed = [k for k in FIELDS if k not in RESUME_MAY_CHANGE and k in saved
               and saved[k] != config.to_dict()[k]]
    if changed:
        raise ConfigError(f"Resuming {run.root} with different settings: {', '.join(changed)} "
                          f"(saved in {run.config_path}). Use the run's own config to resume, "
                          "or start a new run_name.")


def check_steps_left(checkpoint: Checkpoint, max_steps: int, config: Config) -> None:
    done = checkpoint.trainer_state()["step"]
    if done >= max_steps:
        what = (f"num_train_epochs={config.num_train_epochs} ({max_steps} steps)" if config.num_train_epochs > 0
                else f"max_train_steps={max_steps}")
        raise TrainingError(f"Resuming {checkpoint.path}: the run is already at step {done}, "
                            + ("which is" if done == max_steps else "past") + f" {what}; nothing to train. "
                            "Raise it to train further, or sample / export the run as it is.")


# --- models ------------------------------------------------------------------------------------

def load_models(config: Config, device: torch.device, weight_dtype: torch.dtype):
    from diffusers import DDPMScheduler

    from dbnb.env import check_xformers
    from dbnb.models import load_pipeline

    pipe = load_pipeline(config.pretrained_model_name_or_path, vae=config.pretrained_vae_name_or_path,
                         revision=config.revision)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    # Frozen parts run in the mixed-precision dtype; trained parts keep fp32 master weights.
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(config.train_text_encoder)
    pipe.to(device)
    if weight_dtype != torch.float32:
        pipe.vae.to(dtype=weight_dtype)
        if not config.train_text_encoder:
            pipe.text_encoder.to(dtype=weight_dtype)
        if config.use_lora:  # the UNet is frozen too: only the adapters keep fp32 master weights
            pipe.unet.to(dtype=weight_dtype)
    if config.use_lora:
        lora.add_adapters(pipe.unet, pipe.text_encoder, lora.Spec.from_config(config), seed=config.seed)
    if config.attention == "xformers":
        check = check_xformers(device.type)
        if check.ok:
            pipe.unet.enable_xformers_memory_efficient_attention()
        else:
            warnings.warn(f"attention=xformers: {check.detail}; using PyTorch SDPA instead.", stacklevel=2)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if config.trains_text_encoder:
            pipe.text_encoder.gradient_checkpointing_enable()
            if config.use_lora:  # frozen embeddings: the checkpointed layers still need a grad-carrying input
                pipe.text_encoder.enable_input_require_grads()
    return pipe, noise_scheduler


# --- data --------------------------------------------------------------------------------------

@dataclass
class Batches:
    """Instance (and class) tensors plus what the loop needs to cut batches from them."""
    instance: data.ImageSet
    klass: data.ImageSet | None
    latents: dict | None  # cached latent distributions: {(kind, flipped): (mean, std)}

    @property
    def epoch_len(self) -> int:
        return max(len(self.instance), len(self.klass)) if self.klass else len(self.instance)


def gather_examples(config: Config) -> tuple[list[data.Example], list[data.Example]]:
    """The instance and class pictures with their prompts, checked before the model loads or
    the run folder is made: a missing folder or caption stops here, leaving nothing behind."""
    concepts = data.concepts_from_config(config)
    instance, klass = data.examples_for(concepts, config.with_prior_preservation, config.skip_bad_images)
    if config.with_prior_preservation:
        klass = data.select_class_images(klass, config.num_class_images)
    return instance, klass


def read_images(config: Config, tokenizer, examples=None) -> Batches:
    instance, klass = examples or gather_examples(config)
    make = lambda ex: data.ImageSet(ex, tokenizer, config.resolution, config.center_crop,  # noqa: E731
                                    config.background_color, config.hflip, data.CaptionRules.from_config(config),
                                    config.alpha_mask_loss)
    batches = Batches(make(instance), make(klass) if klass else None, None)
    if batches.klass is not None:
        data.refuse_masked_out_class_images(batches.klass)
    return batches


@torch.no_grad()
def cache_latents(batches: Batches, vae, device, dtype, hflip: bool) -> dict:
    """Latent distribution (mean, std) of every image, flipped ones too when hflip is on."""
    cache = {}
    sets = {"instance": batches.instance, "class": batches.klass}
    for kind, images in sets.items():
        if images is None:
            continue
        for flipped in (False, True) if hflip else (False,):
            means, stds = [], []
            for chunk in images.images.split(8):
                chunk = chunk.flip(-1) if flipped else chunk
                dist = vae.encode(chunk.to(device, dtype)).latent_dist
                means.append(dist.mean.float().cpu())
                stds.append(dist.std.float().cpu())
            cache[(kind, flipped)] = (torch.cat(means), torch.cat(stds))
    return cache


def latent_batch(batches: Batches, kind: str, idx: list[int], flips: torch.Tensor, vae, device, dtype):
    """(mean, std) of the latent distributions of one batch, from the cache or the VAE."""
    if batches.latents is not None:
        pick = lambda f: batches.latents[(kind, f)]  # noqa: E731
        mean = torch.stack([pick(bool(f))[0][i] for i, f in zip(idx, flips)])
        std = torch.stack([pick(bool(f))[1][i] for i, f in zip(idx, flips)])
        return mean, std
    images = (batches.instance if kind == "instance" else batches.klass).batch(idx, flips)[0]
    with torch.no_grad():
        dist = vae.encode(images.to(device, dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def next_batch(batches: Batches, micro_step: int, config: Config, rank: int, world: int, vae, device, dtype):
    """Latents, token ids and the class/instance split for one process's micro-batch."""
    g = step_generator(config.seed, micro_step, rank)
    captions = caption_generator(config.seed, micro_step, rank)
    pos = data.batch_positions(micro_step, config.train_batch_size, rank, world, batches.epoch_len, config.seed)
    parts = [("instance", batches.instance, [p % len(batches.instance) for p in pos])]
    if batches.klass is not None:
        parts.append(("class", batches.klass, [p % len(batches.klass) for p in pos]))
    means, stds, ids, masks = [], [], [], []
    for kind, images, idx in parts:
        flips = images.flips(len(idx), g)
        mean, std = latent_batch(batches, kind, idx, flips, vae, device, dtype)
        means.append(mean)
        stds.append(std)
        ids.append(images.token_ids(idx, captions))
        masks.append(images.mask_batch(idx, flips))
    mean, std = torch.cat(means), torch.cat(stds)
    latents = mean + std * torch.randn(mean.shape, generator=g)
    return latents, torch.cat(ids), g, (torch.cat(masks) if masks[0] is not None else None)


# --- the loss ------------------------------------------------------------------------------------

def diffusion_loss(unet, text_encoder, noise_scheduler, latents, input_ids, g, config: Config,
                   scaling_factor: float, device, encode_with_grad: bool, mask=None) -> torch.Tensor:
    latents = (latents * scaling_factor).to(device)
    noise = torch.randn(latents.shape, generator=g)
    if config.offset_noise:
        noise = noise + config.offset_noise * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    noise = noise.to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.set_grad_enabled(encode_with_grad):
        hidden = text_encoder(input_ids.to(device))[0]
    pred = unet(noisy, timesteps, hidden).sample.float()
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_pixel = F.mse_loss(pred, target.float(), reduction="none")
    if mask is not None:  # alpha_mask_loss: kohya's apply_masked_loss (weights, then the plain mean)
        per_pixel = per_pixel * F.interpolate(mask.to(per_pixel), size=per_pixel.shape[-2:], mode="area")
    per_sample = per_pixel.mean(dim=(1, 2, 3))
    if config.snr_gamma:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, config.snr_gamma)
    if config.with_prior_preservation:
        instance, klass = per_sample.chunk(2)
        return instance.mean() + config.prior_loss_weight * klass.mean()
    return per_sample.mean()


def min_snr_weights(noise_scheduler, timesteps, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): weight min(SNR, γ)/SNR, or /(SNR+1) for v-prediction."""
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=gamma) / snr
    if noise_scheduler.config.prediction_type == "v_prediction":
        weights = torch.clamp(snr, max=gamma) / (snr + 1)
    return weights.float()


# --- cancel ------------------------------------------------------------------------------------

@contextmanager
def cancel_on_signal():
    """SIGINT (Ctrl-C, a notebook's stop button) and SIGTERM ask the loop to stop at the next
    step and save, like the extension's Cancel button. A second Ctrl-C stops at once."""
    flag = {"cancel": False}

    def handler(signum, frame):
        if flag["cancel"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["cancel"] = True
        print(f"\n[dbnb] {signal.Signals(signum).name}: stopping after this step and saving "
              "(press Ctrl-C again to stop without saving).", flush=True)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals cannot be caught here
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def memory_advice(config: Config) -> str:
    off = [name for name, on in (("gradient_checkpointing=true", config.gradient_checkpointing),
                                 ("use_8bit_adam=true", config.use_8bit_adam),
                                 ("cache_latents=true", config.cache_latents),
                                 ("mixed_precision=fp16", config.mixed_precision != "no"),
                                 ("train_text_encoder=false", not config.train_text_encoder),
                                 ("train_batch_size=1", config.train_batch_size == 1),
                                 ("sample_every_steps=0", config.sample_every_steps == 0)) if not on]
    return ("Still off: " + ", ".join(off) + ".") if off else \
        "Every memory option is already on: use a GPU with more VRAM or a lower resolution."


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def preview_pipeline(pipe, unet):
    """The pipeline previews render with: the training UNet, and every other part on its
    device (cache_latents parks the VAE on the CPU, where a CUDA UNet's latents cannot reach it)."""
    from diffusers import DPMSolverMultistepScheduler

    parts = {**pipe.components, "unet": unet,
             "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)}
    for part in parts.values():
        if isinstance(part, torch.nn.Module) and _device(part) != _device(unet):
            part.to(_device(unet))
    sampler = pipe.__class__(**parts, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    return sampler


def write_previews(run: RunFolder, step: int, pipe, unet, config: Config) -> Path:
    from dbnb.sample import render, save_previews

    parked = {name: _device(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    sampler = preview_pipeline(pipe, unet)
    was_training = unet.training
    unet.eval()
    try:
        with torch.autocast(unet.device.type, enabled=config.mixed_precision != "no",
                            dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16):
            results = render(sampler, list(config.sample_prompts) or [config.instance_prompt],
                             config.sample_negative_prompt, config.num_samples, config.sample_seed,
                             config.sample_guidance_scale, config.sample_steps, config.resolution)
    finally:
        unet.train(was_training)
        for name, device in parked.items():  # back where they were parked, to free the VRAM again
            if name != "unet" and _device(pipe.components[name]) != device:
                pipe.components[name].to(device)
    return save_previews(results, run.samples_dir(step), cols=config.num_samples)


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


@dataclass
class Session:
    """What the loop works on, set up once by `setup`."""
    config: Config
    accelerator: object
    run: RunFolder
    pipe: object
    noise_scheduler: object
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    ema: object | None
    batches: Batches
    max_steps: int
    weight_dtype: torch.dtype
    step: int = 0
    micro_step: int = 0


def train(config: Config, resume: str | None = None, progress: bool = True, on_step=None) -> TrainResult:
    """Train (or resume) the run of `config`. `on_step(record)` is called on the main process
    after every step with the log record (+ `preview`: the grid written at this step)."""
    from accelerate import Accelerator

    # 1. Where we run: accelerate decides the device and the processes (one, or DDP).
    config = apply_memory_profile(config)  # memory_profile=auto: settings from the GPU's VRAM
    check_machine(config, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = Accelerator(mixed_precision=config.mixed_precision,
                              gradient_accumulation_steps=config.gradient_accumulation_steps,
                              cpu=not torch.cuda.is_available())
    try:
        examples = gather_examples(config)
        with RunFolder.for_config(config).hold(accelerator.is_main_process):
            session = setup(config, accelerator, resume, examples)
            return loop(session, progress, on_step)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            forget_accelerator_state()


def setup(config: Config, accelerator, resume: str | None, examples=None) -> Session:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    device, world = accelerator.device, accelerator.num_processes
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    if config.optimizer_in_backward:
        from dbnb.inbackward import check_supported
        check_supported(config, world)

    # 2. The run folder: a new one, or the one being resumed.
    run, resume_from = open_run(config, resume, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    # 3. Base model and training images.
    pipe, noise_scheduler = load_models(config, device, weight_dtype)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    batches = read_images(config, pipe.tokenizer, examples)
    max_steps = total_steps(config, batches.epoch_len, world)
    if resume_from is not None:
        check_steps_left(resume_from, max_steps, config)

    # 4. Optimizer, LR schedule, EMA — then the saved state when resuming.
    optimizer = optimizers.build(config, unet, text_encoder, world, device)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=config.lr_num_cycles,
                                 power=config.lr_power)
    if not config.use_ema:
        ema = None
    elif config.use_lora:  # the EMA of the adapters, saved beside them
        ema = EMAModel(lora.trainable(unet, text_encoder), decay=config.ema_decay)
    else:
        ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=type(unet), model_config=unet.config)
    state = load_checkpoint(resume_from, unet, text_encoder, ema, config) if resume_from else {}
    # An optimizer that steps inside backward gains nothing from accelerate's wrapper.
    parts = [unet] + ([text_encoder] if config.trains_text_encoder else []) \
        + ([] if config.optimizer_in_backward else [optimizer])
    prepared = accelerator.prepare(*parts)
    prepared = list(prepared) if len(parts) > 1 else [prepared]  # one object comes back bare
    unet = prepared.pop(0)
    text_encoder = prepared.pop(0) if config.trains_text_encoder else text_encoder
    optimizer = prepared.pop(0) if prepared else optimizer
    if resume_from is not None:
        load_optimizer_state(resume_from, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(device)

    # 5. Latents once, so the VAE can leave the GPU (flipped copies too when hflip is on).
    if config.cache_latents:
        batches.latents = cache_latents(batches, pipe.vae, device, weight_dtype, config.hflip)
        pipe.vae.to("cpu")
    if accelerator.is_main_process:
        run.truncate_log(state.get("step", 0))
    return Session(config, accelerator, run, pipe, noise_scheduler, unet, text_encoder, optimizer, lr_scheduler,
                   ema, batches, max_steps, weight_dtype, state.get("step", 0), state.get("micro_step", 0))


def loop(s: Session, progress: bool, on_step=None) -> TrainResult:
    from dbnb.progress import bar as tqdm

    # 6. The loop: one optimizer step per pass; save on schedule, on cancel and at the end.
    acc, config = s.accelerator, s.config
    if acc.is_main_process:
        print(f"[dbnb] run folder {shown(s.run.root)}: {len(s.batches.instance)} instance images"
              + (f", {len(s.batches.klass)} class images" if s.batches.klass else "")
              + f", steps {s.step} → {s.max_steps}, device {acc.device}, {acc.num_processes} process(es)", flush=True)
    saved, cancelled, started = [], False, time.time()
    bar = tqdm(total=s.max_steps, initial=s.step, disable=not (progress and acc.is_main_process),
               desc="training", unit="step", dynamic_ncols=True)
    s.unet.train()
    with cancel_on_signal() as flag:
        try:
            while s.step < s.max_steps and not cancelled:
                loss, grad_norm = optimizer_step(s)
                lr = s.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                cancelled = flag["cancel"]
                if acc.is_main_process:
                    record = {"step": s.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "time": round(time.time() - started, 3)}
                    s.run.append_log(record)
                    if config.sample_every_steps and s.step % config.sample_every_steps == 0:
                        record["preview"] = str(write_previews(s.run, s.step, s.pipe, acc.unwrap_model(s.unet),
                                                               config))
                    if on_step is not None:
                        on_step({**record, "max_steps": s.max_steps, "last": cancelled or s.step == s.max_steps})
                due = config.save_every_steps and s.step % config.save_every_steps == 0
                if due or cancelled or s.step == s.max_steps:
                    if bad := non_finite_part(s):
                        raise diverged(s, f"A value in the {bad}", "inf or NaN", at=s.step)
                    if acc.is_main_process:
                        saved.append(save_checkpoint(s.run, s.step, s.micro_step, acc.unwrap_model(s.unet),
                                                     acc.unwrap_model(s.text_encoder), s.optimizer,
                                                     s.lr_scheduler, s.ema, config))
                    acc.wait_for_everyone()
        except KeyboardInterrupt:
            if not flag["cancel"]:  # not ours (a notebook's interrupt outside the handler): as it was
                raise
            found = s.run.checkpoints()
            raise TrainingError(f"Stopped at step {s.step} without saving (Ctrl-C twice); last checkpoint: "
                                f"{found[-1].path if found else 'none'}.") from None
        except torch.OutOfMemoryError as e:
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


def optimizer_step(s: Session) -> tuple[float, float | None]:
    """Micro-batches until the optimizer has stepped once; returns the last loss and the
    pre-clip gradient norm."""
    acc, config = s.accelerator, s.config
    rank, world = acc.process_index, acc.num_processes
    train_te = config.trains_text_encoder and s.step < int(config.stop_text_encoder * s.max_steps)
    # A frozen text encoder runs outside DDP, which would otherwise wait for its gradients.
    encoder = s.text_encoder if train_te else acc.unwrap_model(s.text_encoder)
    encoder.train(train_te)
    while True:
        with acc.accumulate(s.unet):
            latents, ids, g, mask = next_batch(s.batches, s.micro_step, config, rank, world, s.pipe.vae,
                                               acc.device, s.weight_dtype)
            if config.use_lora and config.lora_dropout:  # peft's dropout draws from the global RNG
                torch.manual_seed(dropout_seed(config.seed, s.micro_step, rank))
            loss = diffusion_loss(s.unet, encoder, s.noise_scheduler, latents, ids, g, config,
                                  s.pipe.vae.config.scaling_factor, acc.device, train_te, mask)
            if not torch.isfinite(loss):
                raise diverged(s, "Loss", loss.item())
            acc.backward(loss)
            grad_norm = None
            if acc.sync_gradients and not config.optimizer_in_backward:
                grad_norm = divergence.gradient_norm(acc, s.optimizer, config.max_grad_norm)
                # before the step, so the weights in memory stay the last good ones
                if grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None:
                    raise diverged(s, "The gradient norm", grad_norm)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            grad_norm = getattr(s.optimizer, "grad_norm", grad_norm)  # in-backward: measured in the hooks
            if grad_norm is not None and not math.isfinite(grad_norm) and acc.scaler is None:
                raise diverged(s, "The gradient norm", grad_norm)
        s.micro_step += 1
        if acc.sync_gradients:
            break
    s.lr_scheduler.step()
    s.step += 1
    if s.ema is not None:
        s.ema.step(trained_parameters(s))
    return loss.item(), grad_norm


def trained_parameters(s: Session) -> list[torch.nn.Parameter]:
    """What the EMA follows: the UNet, or with use_lora every adapter."""
    unet = s.accelerator.unwrap_model(s.unet)
    if s.config.use_lora:
        return lora.trainable(unet, s.accelerator.unwrap_model(s.text_encoder))
    return list(unet.parameters())


def non_finite_part(s: Session) -> str:
    """Which trained tensors hold an inf or NaN ("" when none): checked before every save."""
    acc = s.accelerator
    unet, text_encoder = acc.unwrap_model(s.unet), acc.unwrap_model(s.text_encoder)
    parts = {"UNet weights": [p for p in unet.parameters() if p.requires_grad]}
    if s.config.trains_text_encoder:
        parts["text encoder weights"] = [p for p in text_encoder.parameters() if p.requires_grad]
    if s.ema is not None:
        parts["EMA weights"] = list(s.ema.shadow_params)
    parts["optimizer state"] = divergence.optimizer_tensors(s.optimizer)
    return divergence.first_non_finite(parts)


def diverged(s: Session, what: str, value, at: int | None = None) -> TrainingError:
    return TrainingError(divergence.message(what, value, at or s.step + 1, s.step, s.run.checkpoints(),
                                            s.config.learning_rate))


def forget_accelerator_state() -> None:
    """accelerate keeps one process-wide state; a notebook that trains again with another
    mixed_precision would otherwise fail with 'AcceleratorState has already been initialized'."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
