"""memory_profile=auto: the three memory settings chosen from the GPU's VRAM.

Training memory on SD 1.5 at 512 px is decided by mixed_precision, use_8bit_adam and
gradient_checkpointing. `TIERS` is the one table that maps a GPU's VRAM to them; `train`
applies it at the start when memory_profile=auto and prints what it chose. Until
bench/gpu_suite.py has measured dbnb itself on GPUs (docs/performance.md), the tiers rest on
the figures other DreamBooth trainers publish, kept here in `PUBLISHED` (docs/performance.md
shows them beside dbnb's own).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from dbnb.core.config import FIELDS, Config, ConfigError


@dataclass(frozen=True)
class Published:
    """One figure another trainer publishes for SD 1.x DreamBooth at 512 px, batch 1."""
    source: str
    gpu: str
    settings: str
    vram_gb: float | None
    it_per_s: float | None
    note: str = ""


SHIVAM = "ShivamShrirao diffusers DreamBooth README"
PUBLISHED = (
    Published(SHIVAM, "T4", "fp16 + gradient checkpointing + 8-bit Adam", 9.92, 0.93),
    Published(SHIVAM, "T4", "fp16 + 8-bit Adam, no gradient checkpointing", 11.17, 1.14),
    Published(SHIVAM, "T4", "fp16 + gradient checkpointing, no 8-bit Adam", 15.79, 0.77),
    Published(SHIVAM, "T4", "fp32", 10.08, 0.42),
    Published("kohya sd-scripts docs", "-", "xformers + 8-bit AdamW + fp16 + cached latents + "
              "gradient checkpointing", 12.0, None, "about 12 GB"),
    Published("kohya sd-scripts docs", "-", "the same + full_fp16 (fp16 weights)", 8.0, None,
              "< 8 GB; dbnb keeps fp32 master weights"),
    Published("TheLastBen fast-DreamBooth README", "T4", "its Colab defaults", 14.0, 0.85,
              "'< 12 GB', later '< 14 GB'; 0.85 it/s at 640 px"),
    Published("the seed guide", "-", "the webui Dreambooth extension", 12.0, None, "12 GB VRAM needed"),
)
T4_FIGURE, NO_CHECKPOINTING_FIGURE, NO_8BIT_FIGURE = PUBLISHED[0], PUBLISHED[1], PUBLISHED[2]


@dataclass(frozen=True)
class Tier:
    min_vram_gib: float  # what torch reports as the card's total (a "40 GB" A100 shows 39.4)
    cards: str
    settings: dict
    expected: Published | None  # the published figure closest to these settings, None where none is


# Highest first. Each step up spends the VRAM that the published figures say it costs on
# speed: no checkpointing (+1.3 GB, +23 % it/s), then no 8-bit Adam (+5.9 GB with checkpointing on;
# nobody publishes both off) and bf16.
TIERS = (
    Tier(36.0, "40 GB or more (A100, H100)",
         {"mixed_precision": "bf16", "use_8bit_adam": False, "gradient_checkpointing": False}, None),
    Tier(20.0, "24 GB (A10G, L4, RTX 3090 / 4090)",
         {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": False},
         NO_CHECKPOINTING_FIGURE),
    Tier(0.0, "up to 16 GB (T4, 12 GB cards)",
         {"mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True}, T4_FIGURE),
)
NO_GPU = {"mixed_precision": "no", "use_8bit_adam": False, "gradient_checkpointing": False}
BASIS = "published figures of other trainers (dbnb's own GPU figures: none yet, see docs/performance.md)"


@dataclass(frozen=True)
class Choice:
    settings: dict
    message: str


def choose(gpu: dict | None) -> Choice:
    """The memory settings for `gpu` (as `dbnb.core.hardware.cuda_summary()` returns it: name,
    total_vram_gib, bf16), or for no CUDA GPU when None."""
    if gpu is None:
        return Choice(dict(NO_GPU), "no CUDA GPU: " + settings_text(NO_GPU))
    vram = float(gpu["total_vram_gib"])
    tier = next(t for t in TIERS if vram >= t.min_vram_gib)
    settings = dict(tier.settings)
    notes = []
    if settings["mixed_precision"] == "bf16" and not gpu.get("bf16", False):
        settings["mixed_precision"] = "fp16"
        notes.append("this GPU has no bf16, so fp16")
    if tier.expected and tier.expected.vram_gb and tier.expected.vram_gb > vram:
        notes.append(f"the published figure for these settings is {tier.expected.vram_gb:g} GB, more than this "
                     "GPU has: it may run out of memory (lower resolution, or a GPU with more VRAM)")
    text = (f"{gpu.get('name', 'GPU')} with {vram:.1f} GiB → the tier for {tier.cards}: {settings_text(settings)}"
            + "".join(f"; {n}" for n in notes) + f". Based on {BASIS}.")
    return Choice(settings, text)


def apply_memory_profile(config: Config, gpu: dict | None | str = "detect", resumed: dict | None = None) -> Config:
    """`config` with its memory settings chosen when memory_profile=auto (printed), else as it is.
    `gpu`: the GPU to choose for (cuda_summary()'s dict, or None for none); "detect" asks torch.
    `resumed`: the saved config of the run being resumed, whose settings that change what is
    learnt (use_8bit_adam: its state is in the checkpoint) stay as the run started, whatever
    GPU tier this session landed on."""
    if config.memory_profile == "manual":
        return config
    if gpu == "detect":
        from dbnb.core.hardware import cuda_summary
        gpu = cuda_summary()
    choice = choose(gpu)
    if config.optimizer_in_backward and choice.settings["mixed_precision"] == "fp16":
        raise ConfigError(f"memory_profile=auto chose mixed_precision=fp16 ({choice.message}), which "
                          "optimizer_in_backward=true cannot use: set optimizer_in_backward=false, or "
                          "memory_profile=manual with mixed_precision=no.")
    settings, message = dict(choice.settings), choice.message
    if config.optimizer == "adamw8bit" and not settings["use_8bit_adam"]:
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
