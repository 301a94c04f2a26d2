"""memory_profile=auto: the fastest memory settings that fit the GPU, by the planner's prediction.

Training memory is decided above all by mixed_precision, use_8bit_adam and gradient_checkpointing.
`PROFILES` lists their combinations fastest first; `choose` asks dbnb.train.planner for each one's
peak VRAM with the run's other settings (resolution, batch, text encoder, LoRA, EMA, optimizer …)
and takes the first that fits the card with planner.FIT_MARGIN_GIB to spare. `verdict` says it for
one card (`dbnb plan`, `dbnb doctor`); `check_fits` stops notebook 04 before training with the fix
when the settings cannot fit. `PUBLISHED` keeps the
figures other DreamBooth trainers publish, which docs/performance.md and bench/bench_plan.py set
beside the planner's predictions.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from dbnb.core.config import FIELDS, GUIDE_CHARACTER, Config, ConfigError


@dataclass(frozen=True)
class Published:
    """One figure another trainer publishes for SD 1.x DreamBooth at 512 px, batch 1."""
    source: str
    gpu: str
    settings: str
    vram_gb: float | None
    it_per_s: float | None
    note: str = ""
    config: dict | None = None  # the same settings as dbnb's, for the planner; None where dbnb has none like them


SHIVAM = "ShivamShrirao diffusers DreamBooth README"
# His table's runs: UNet only, the VAE encoding every step, prior preservation as in his README's
# commands (an instance and a class picture per step, 200 class images), 512 px.
PRIOR = {"with_prior_preservation": True, "class_prompt": "a photo of dog", "class_data_dir": "class_images",
         "num_class_images": 200}
SHIVAM_RUN = {"train_text_encoder": False, "cache_latents": False, **PRIOR}
PUBLISHED = (
    Published(SHIVAM, "T4", "fp16 + gradient checkpointing + 8-bit Adam", 9.92, 0.93,
              config={**SHIVAM_RUN, "gradient_checkpointing": True, "use_8bit_adam": True}),
    Published(SHIVAM, "T4", "fp16 + 8-bit Adam, no gradient checkpointing", 11.17, 1.14,
              config={**SHIVAM_RUN, "gradient_checkpointing": False, "use_8bit_adam": True}),
    Published(SHIVAM, "T4", "fp16 + gradient checkpointing, no 8-bit Adam", 15.79, 0.77,
              config={**SHIVAM_RUN, "gradient_checkpointing": True, "use_8bit_adam": False}),
    Published(SHIVAM, "T4", "fp32 (no fp16) + gradient checkpointing + 8-bit Adam", 10.08, 0.42,
              config={**SHIVAM_RUN, "mixed_precision": "no", "gradient_checkpointing": True, "use_8bit_adam": True}),
    Published("kohya sd-scripts docs", "-", "xformers + 8-bit AdamW + fp16 + cached latents + "
              "gradient checkpointing", 12.0, None, "about 12 GB; the text encoder trained (train_db.py's default)",
              config={"attention": "xformers", "use_8bit_adam": True, "gradient_checkpointing": True,
                      "cache_latents": True, "train_text_encoder": True}),
    Published("kohya sd-scripts docs", "-", "the same + full_fp16 (fp16 weights)", 8.0, None,
              "< 8 GB; dbnb keeps fp32 master weights"),
    Published("diffusers examples/dreambooth README", "-", "fp16 + 8-bit Adam + gradient checkpointing + "
              "xformers, prior preservation", 12.0, None, "'train on a 12GB GPU': an upper bound",
              config={**SHIVAM_RUN, "attention": "xformers", "gradient_checkpointing": True, "use_8bit_adam": True}),
    Published("TheLastBen fast-DreamBooth README", "T4", "its Colab defaults", 14.0, 0.85,
              "'< 12 GB', later '< 14 GB'; 0.85 it/s at 640 px"),
    Published("the seed guide", "-", "the webui Dreambooth extension, the guide's character setup", 12.0, None,
              "12 GB VRAM needed; predicted: dbnb's person preset", config=dict(GUIDE_CHARACTER)),
)


# Fastest first. No checkpointing is the largest gain (ShivamShrirao's T4 table: 1.14 it/s against 0.93);
# 8-bit Adam costs no speed there (0.93 against 0.77 without it) but is kept for where memory needs it:
# full-precision AdamW is the reference optimizer.
PROFILES = ({"gradient_checkpointing": False, "use_8bit_adam": False},
            {"gradient_checkpointing": False, "use_8bit_adam": True},
            {"gradient_checkpointing": True, "use_8bit_adam": False},
            {"gradient_checkpointing": True, "use_8bit_adam": True})
NO_GPU = {"mixed_precision": "no", "use_8bit_adam": False, "gradient_checkpointing": False}
BASIS = "dbnb's planner (`dbnb plan`: the training step traced on fake tensors, calibrated by bench/gpu_suite.py)"


@dataclass(frozen=True)
class Choice:
    settings: dict
    message: str
    predicted_gib: float | None = None  # the planner's peak VRAM for these settings (None: no GPU)
    fits: bool = True


def candidates(config: Config, bf16: bool) -> list[dict]:
    """The memory settings auto may choose for `config`, fastest first: each of the family's own
    tiers (SDXL: the latents and text embeddings cached, then the latents uncached) with each profile."""
    from dbnb.train.planner import family_rules  # lazy: the planner imports diffusers to trace

    precision = "bf16" if bf16 else "fp16"
    rules = family_rules(config)
    tiers = rules.auto_settings(config) if rules is not None else [{}]
    found = []
    for tier in tiers:
        for profile in PROFILES:
            settings = {"mixed_precision": precision, **profile, **tier}
            if config.optimizer == "adamw8bit":  # an optimizer named outright is the user's choice
                settings["use_8bit_adam"] = True
            if settings not in found:
                found.append(settings)
    return found


def refusal(config: Config, gpu: dict | None) -> str | None:
    """Why `config`'s family does not train it on `gpu` at all (SDXL: a full fine-tune below 40 GB),
    whatever the memory settings; None where it may."""
    from dbnb.train.planner import family_rules  # lazy: the planner imports diffusers to trace

    rules = family_rules(config) if gpu is not None else None
    return rules.refusal(config, gpu) if rules is not None else None


def choose(config: Config, gpu: dict | None) -> Choice:
    """The memory settings for training `config` on `gpu` (as `dbnb.core.hardware.cuda_summary()`
    returns it: name, total_vram_gib, bf16), or for no CUDA GPU when None."""
    from dbnb.train.planner import plan  # lazy: the planner imports diffusers to trace

    if gpu is None:
        return Choice(dict(NO_GPU), "no CUDA GPU: " + settings_text(NO_GPU))
    vram, tried = float(gpu["total_vram_gib"]), candidates(config, bool(gpu.get("bf16", False)))
    if why := refusal(config, gpu):
        return Choice(tried[-1], why, fits=False)
    name = gpu.get("name", "GPU")
    try:
        predictions = ((settings, plan(config.replace(**settings))) for settings in tried)
        found = next(((s, p) for s, p in predictions if p.fits(vram)), None)
        fits = found is not None
        settings, predicted = found or (tried[-1], plan(config.replace(**tried[-1])))
    except Exception as e:  # auto must not stop a run the planner cannot size: every memory option on then
        settings = tried[-1]
        return Choice(settings, f"{name} with {vram:.1f} GiB → {settings_text(settings)}: the planner could not "
                                f"size this run ({type(e).__name__}: {e}), so every memory option is on.")
    if fits:
        note = f"predicted peak {predicted.vram_gib:.1f} GiB, {vram - predicted.vram_gib:.1f} GiB to spare"
    else:
        note = (f"predicted peak {predicted.vram_gib:.1f} GiB, more than this GPU has even with every memory option "
                "on: it may run out of memory (lower resolution or train_batch_size, use_lora=true, or a GPU "
                "with more VRAM)")
    text = f"{name} with {vram:.1f} GiB → {settings_text(settings)}: {note}. Based on {BASIS}."
    return Choice(settings, text, predicted.vram_gib, fits)


def verdict(config: Config, gpu: dict) -> tuple[bool, str]:
    """(fits, one line) for training `config` on `gpu` (name, total_vram_gib, bf16: as
    `dbnb.core.hardware.cuda_summary()` or `dbnb.train.planner.card` gives it)."""
    from dbnb.train.planner import FIT_MARGIN_GIB, plan  # lazy: the planner imports diffusers to trace

    name, total = gpu.get("name", "GPU"), float(gpu["total_vram_gib"])
    if why := refusal(config, gpu):
        return False, why
    if config.memory_profile == "auto":
        choice = choose(config, gpu)
        return choice.fits, f"{name}: memory_profile=auto → {choice.message}"
    if config.mixed_precision == "bf16" and not gpu.get("bf16", False):
        return False, f"{name}: cannot run mixed_precision=bf16 (no bf16 on this card): set mixed_precision=fp16."
    predicted = plan(config)
    if predicted.fits(total):
        return True, f"{name}: fits ({total:.1f} GiB) with {total - predicted.vram_gib:.1f} GiB to spare."
    choice = choose(config, gpu)
    changes = {k: v for k, v in choice.settings.items() if getattr(config, k) != v}
    if choice.fits and changes:
        fix = f"set {settings_text(changes)} (predicted {choice.predicted_gib:.1f} GiB), or memory_profile=auto"
    else:
        fix = ("even with every memory option on it would not: lower resolution or train_batch_size, "
               "use_lora=true, or a card with more VRAM")
    return False, (f"{name}: does not fit ({total:.1f} GiB): predicted {predicted.vram_gib:.1f} GiB "
                   f"+ {FIT_MARGIN_GIB:g} GiB kept free; {fix}.")


def check_fits(config: Config, gpu: dict | None | str = "detect") -> bool:
    """Print the planner's verdict for this machine's GPU (notebook 04, before training) and stop
    with the fix when `config` cannot fit it. Without a CUDA GPU: the verdict for a T4, said only."""
    from dbnb.train.planner import card

    if gpu == "detect":
        from dbnb.core.hardware import cuda_summary
        gpu = cuda_summary()
    ok, line = verdict(config, gpu or card("T4"))
    if gpu is None:
        print(f"[dbnb] no CUDA GPU here; on a Colab T4 — T4 の場合: {line}", flush=True)
        return ok
    print(f"[dbnb] {line}", flush=True)
    if not ok:
        raise ConfigError(f"The settings do not fit this GPU — この設定ではこの GPU のメモリに収まりません: {line}")
    return ok


def apply_memory_profile(config: Config, gpu: dict | None | str = "detect", resumed: dict | None = None) -> Config:
    """`config` with its memory settings chosen when memory_profile=auto (printed), else as it is.
    `gpu`: the GPU to choose for (cuda_summary()'s dict, or None for none); "detect" asks torch.
    `resumed`: the saved config of the run being resumed, whose settings that change what is
    learnt (use_8bit_adam: its state is in the checkpoint) stay as the run started, whatever
    GPU tier this session landed on."""
    if gpu == "detect":
        from dbnb.core.hardware import cuda_summary
        gpu = cuda_summary()
    if why := refusal(config, gpu):
        raise ConfigError(f"This run cannot train on this GPU — この GPU ではこの学習はできません: {why}")
    if config.memory_profile == "manual":
        return config
    choice = choose(config, gpu)
    if config.optimizer_in_backward and choice.settings["mixed_precision"] == "fp16":
        raise ConfigError(f"memory_profile=auto chose mixed_precision=fp16 ({choice.message}), which "
                          "optimizer_in_backward=true cannot use: set optimizer_in_backward=false, or "
                          "memory_profile=manual with mixed_precision=no.")
    settings, message = dict(choice.settings), choice.message
    if config.optimizer == "adamw8bit" and gpu is None:
        # An optimizer named outright is the user's choice, not a memory default to trade away.
        settings["use_8bit_adam"] = True
        message += " use_8bit_adam stays true: optimizer=adamw8bit asks for it."
    kept = {k: resumed[k] for k, v in settings.items()
            if resumed and k in resumed and resumed[k] != v and FIELDS[k].metadata["learns"]}
    if kept:
        settings.update(kept)
        message += f" Kept from the run being resumed (they change what it learns): {settings_text(kept)}."
    print(f"[dbnb] memory_profile=auto: {message}", flush=True)
    return config.replace(**settings)


def settings_text(settings: dict) -> str:
    """`key=value, ...` as the command line writes them."""
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())


def memory_advice(config: Config) -> str:
    """The memory-saving settings (config's `memory_saving`) still off, as `name=value`."""
    off = []
    for name, f in FIELDS.items():
        saving = f.metadata["memory_saving"]
        values = saving if isinstance(saving, tuple) else (saving,)
        if name == "train_text_encoder" and config.use_lora:  # not used by a LoRA run (its help)
            continue
        if saving is not None and getattr(config, name) not in values:
            # Those that change what is learnt cannot be turned on for a resume: say so here.
            off.append(f"{name}={values[0] if isinstance(values[0], str) else json.dumps(values[0])}"
                       + (" (for a new run: it changes what is learnt)" if f.metadata["learns"] else ""))
    return ("Still off: " + ", ".join(off) + ".") if off else \
        "Every memory option is already on: use a GPU with more VRAM or a lower resolution."
