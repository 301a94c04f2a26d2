"""Know before the GPU: a run's peak VRAM and system RAM, predicted on any machine (a CPU-only
one too) from the config alone, and a verdict per card.

VRAM is summed, phase by phase, from what the loop keeps on its device:

* from the parameter counts of the parts built without weights (dbnb.train.steptrace): the
  weights in their training dtypes, the fp32 gradients, the optimizer's state (its real sizes,
  8-bit ones included: dbnb.train.optimizers.state_bytes), the EMA's fp32 copy and the
  temporary copy its foreach update makes;
* from the step itself, run on fake tensors (dbnb.train.steptrace): the activations under
  autocast and gradient checkpointing (autocast's fp16 copies of the fp32 weights included),
  the recomputation in backward, the autoencoder's encode;
* then the CUDA context and the caching allocator's slack (`CUDA_CONTEXT_GIB`, `ALLOCATOR_SLACK`:
  stated, until bench/gpu_suite.py measures them).

With bucketing the step is traced square at `resolution`: every bucket holds at most resolution²
pixels (dbnb.data.buckets.bucket_sizes), and the activations follow the latent pixels, so the
square step bounds the largest bucket's.

The step trace takes seconds to minutes on a slow CPU, so its result is kept by what shapes it
(`trace_key`: the model's configs, resolution, batch, precision, checkpointing, adapters, which
parts learn): dbnb ships the traces of its common settings (`SHIPPED`, written by
bench/bench_plan.py --write) and keeps new ones in dbnb's cache folder. The optimizer, the EMA
and gradient accumulation are outside the key: they are sums of the parameter counts.

System RAM is an estimate from the same counts and the copies the code makes (see `ram_phases`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dbnb.core.config import Config
from dbnb.core.errors import DbnbError
from dbnb.core.platform import default_cache_dir
from dbnb.family.base import family_of
from dbnb.train.optimizers import state_bytes, wanted
from dbnb.train.steptrace import StepTrace

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5    # CUDA context, cuBLAS / cuDNN handles and workspaces: outside torch's allocator
ALLOCATOR_SLACK = 0.05    # reserved beyond allocated by the caching allocator (block rounding, fragmentation)
FIT_MARGIN_GIB = 0.5      # kept free on the card when deciding what fits: other processes, a preview's pipeline
RAM_BASE_GIB = 2.0        # Python with torch, diffusers and transformers imported, a notebook kernel around it

# What torch reports as each card's total (what "fits" is measured against) and whether it has bf16.
CARDS = {"T4": (14.74, False), "L4": (22.06, True), "A10G": (22.07, True), "A100-40": (39.39, True),
         "A100-80": (79.25, True), "H100": (79.11, True)}
# Optimizer name (dbnb.train.optimizers.name_of) by what the settings ask for.
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "lion8bit": "Lion8bit",
                   "prodigy": "Prodigy"}
# Copies of the largest trained tensor an optimizer's step makes on the way (fused AdamW and
# bitsandbytes' kernels update in place; torch's Lion and Prodigy loop in Python with temporaries).
STEP_TEMPORARIES = {"AdamW": 0, "AdamW8bit": 0, "Lion8bit": 0, "Lion": 2, "Prodigy": 3}
# The settings that shape the traced step (the rest are sums of the parameter counts). attention is
# not one: SDPA and xformers both attend without the tokens x tokens matrix.
TRACED = ("resolution", "train_batch_size", "with_prior_preservation", "mixed_precision", "gradient_checkpointing",
          "cache_latents", "use_lora", "lora_rank", "lora_conv_rank", "lora_text_encoder_rank", "train_text_encoder")
TRACE_VERSION = 1  # raised when dbnb.train.steptrace counts differently: older cached traces no longer match
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "plan" / "traces.json"


class PlanError(DbnbError, ValueError):
    """The planner cannot size this config; the message says what is missing."""


@dataclass(frozen=True)
class Plan:
    """A run's predicted peak VRAM (by phase, then its parts) and peak system RAM."""
    phases: dict          # phase -> bytes allocated by torch at its highest point
    parts: dict           # the highest phase's bytes by part
    peak_phase: str
    ram: dict             # phase -> bytes of system RAM (estimate)

    @property
    def allocated(self) -> int:
        return self.phases[self.peak_phase]

    @property
    def vram_gib(self) -> float:
        """What the card must hold: the allocator's peak, its slack and the CUDA context."""
        return self.allocated * (1 + ALLOCATOR_SLACK) / GIB + CUDA_CONTEXT_GIB

    @property
    def ram_gib(self) -> float:
        return max(self.ram.values()) / GIB

    def fits(self, total_gib: float) -> bool:
        return self.vram_gib + FIT_MARGIN_GIB <= total_gib

    def table(self) -> str:
        """The parts of the peak, one line each, then the phases and the RAM."""
        rows = [f"  {name:<28}{size / GIB:7.2f} GiB" for name, size in self.parts.items()]
        rows.append(f"  {'CUDA context + allocator':<28}{self.vram_gib - self.allocated / GIB:7.2f} GiB")
        rows.append(f"  {'peak VRAM (' + self.peak_phase + ')':<28}{self.vram_gib:7.2f} GiB")
        rows.append("  phases: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.phases.items()) + " GiB allocated")
        rows.append("  system RAM (estimate): " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.ram.items())
                    + f" GiB → peak {self.ram_gib:.1f} GiB")
        return "\n".join(rows)


def card(name: str) -> dict:
    """A card named in CARDS (any case), or given as its GiB, as cuda_summary() describes a GPU."""
    for known, (total, bf16) in CARDS.items():
        if known.lower() == name.strip().lower():
            return {"name": known, "total_vram_gib": total, "bf16": bf16}
    try:
        total = float(name)
    except ValueError:
        raise PlanError(f"--card {name!r}: not a card dbnb knows ({', '.join(CARDS)}) nor a size in GiB "
                        "(e.g. 12): name one of those, or give the card's VRAM as a number.") from None
    return {"name": f"{total:g} GiB card", "total_vram_gib": total, "bf16": True}


def sizable(config: Config):
    """`config`'s family, if it can build its parts without weights (the planner's two optional
    family methods, `part_configs` and `empty_parts`: SD 1.x's in dbnb.family.sd1.memory)."""
    family = family_of(config)
    if not (hasattr(family, "part_configs") and hasattr(family, "empty_parts")):
        raise PlanError(f"The {family.name} family has no part_configs(source) / empty_parts(config, dtype): "
                        "dbnb cannot size its training step. Add them beside its load (dbnb.family.sd1.memory "
                        "is SD 1.x's).")
    return family


def family_rules(config: Config):
    """The memory rules of `config`'s family (optional: SDXL's, dbnb.family.sdxl.memory: its
    memory_profile=auto tiers, what it refuses, its load's RAM), or None."""
    family = family_of(config)
    return family.memory_rules() if hasattr(family, "memory_rules") else None


def trace_key(config: Config) -> str:
    """What shapes the step's trace: the family, its parts' configs and the TRACED settings."""
    family = sizable(config)
    shapes = family.part_configs(config.pretrained_model_name_or_path)
    for part in shapes.values():  # what the saving diffusers / transformers version wrote, not a shape
        for name in ("_diffusers_version", "transformers_version", "_name_or_path", "torch_dtype"):
            part.pop(name, None)
    wanted_settings = {name: getattr(config, name) for name in TRACED}
    text = json.dumps({"version": TRACE_VERSION, "family": family.name, "parts": shapes, "settings": wanted_settings},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def user_cache() -> Path:
    return default_cache_dir() / "plan" / "traces.json"


def step_trace(config: Config, cache: bool = True) -> StepTrace:
    """The step's trace: shipped, cached, or traced now (then cached)."""
    from dbnb.train.steptrace import trace_step

    key = trace_key(config)
    if cache:
        for path in (SHIPPED, user_cache()):
            if (found := _read(path).get(key)) is not None:
                return StepTrace(**{**found, "trained": tuple(found["trained"])})
    trace = trace_step(config, sizable(config).empty_parts)
    if cache:
        store(user_cache(), {key: trace})
    return trace


def store(path: Path, traces: dict) -> None:
    """Add `traces` (key -> StepTrace) to the JSON file at `path`."""
    known = _read(path)
    known.update({key: asdict(trace) for key, trace in traces.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, sort_keys=True))


def plan(config: Config, trace: StepTrace | None = None) -> Plan:
    """The predicted peak VRAM and RAM of training `config` on one GPU."""
    trace = trace or step_trace(config)
    optimizer = OPTIMIZER_NAMES.get(wanted(config), "AdamW")
    optimizer_state = state_bytes(optimizer, [torch.empty(n, device="meta") for n in trace.trained])
    ema = trace.trained_bytes if config.use_ema else 0
    autoencoder = 0 if config.cache_latents else trace.autoencoder  # cached: it leaves the GPU before training
    weights = trace.weights - (trace.encoder if caches_text(config) else 0)  # cached: the encoders leave it too
    held = {"weights": weights, "autoencoder": autoencoder, "optimizer state": optimizer_state,
            "EMA weights": ema}
    # Accumulating, the next micro-step's forward runs beside the gradients kept so far.
    forward = trace.forward_peak + (trace.gradients if config.gradient_accumulation_steps > 1 else 0)
    steps = {
        "latent cache": {"weights": trace.weights, "autoencoder": trace.autoencoder, "EMA weights": ema,
                         "encoding": trace.encode_peak} if config.cache_latents else None,
        "encode": None if config.cache_latents else {**held, "encoding": trace.encode_peak},
        "forward/backward": {**held, "activations and gradients": max(forward, trace.backward_peak)},
        "optimizer step": {**held, "gradients": trace.gradients,
                           "step temporaries": 4 * STEP_TEMPORARIES[optimizer] * max(trace.trained, default=0)},
        "EMA update": {**held, "EMA's temporary copy": trace.trained_bytes} if ema else None,
    }
    by_phase = {name: parts for name, parts in steps.items() if parts is not None}
    phases = {name: sum(parts.values()) for name, parts in by_phase.items()}
    peak = max(phases, key=phases.get)
    return Plan(phases=phases, parts={k: v for k, v in by_phase[peak].items() if v}, peak_phase=peak,
                ram=ram_phases(config, trace))


def caches_text(config: Config) -> bool:
    """Whether the run encodes its prompts once before training (`cache_text_embeddings`), which
    only frozen encoders allow."""
    return config.cache_text_embeddings and not config.trains_text_encoder


def ram_phases(config: Config, trace: StepTrace) -> dict:
    """System RAM by phase, estimated from the parameter counts and the copies each phase makes:

    * load: diffusers reads the weights straight into fp32 parts on the host before they move to
      the GPU (all parts, fp32); a single .safetensors / .ckpt file is read whole first (its
      tensors in fp16, the common SD 1.x file) and converted beside them;
    * save: a checkpoint's weights are cast to fp16 on the device and written from the host
      (dbnb.run.checkpoints: the trained parts in fp16); the optimizer state is written tensor by tensor;
    * export: the pipeline loaded in fp32 and the single file's state dict in fp16 beside it.
    Each on top of `RAM_BASE_GIB`. A family with memory rules may read and export its parts otherwise
    (SDXL: in their training dtypes, and exported from fp16 parts; dbnb.family.sdxl.memory)."""
    base = RAM_BASE_GIB * GIB
    every_part = 4 * trace.parameters
    single_file = every_part // 2 if str(config.pretrained_model_name_or_path).endswith((".safetensors", ".ckpt")) else 0
    rules = family_rules(config)
    load = rules.load_ram(trace) if rules is not None else every_part + single_file
    export = rules.export_ram(trace) if rules is not None else every_part + every_part // 2
    return {"load": base + load,
            "save": base + trace.trained_bytes // 2,
            "export": base + export}

