"""The memory planner (dbnb.train.planner) against its reference and against published figures.

    python bench/bench_plan.py                 # `dbnb plan` wall time, the published table
    python bench/bench_plan.py --reference 256 # + the full step under torch's MemTracker at 256 px (minutes)
    python bench/bench_plan.py --write         # trace SHIPPED again into dbnb/assets/plan/traces.json
    python bench/bench_plan.py --record docs   # the published table as docs/cpu-results/plan.json

The reference is the whole training step of the same config on fake tensors, counted by
torch.distributed._tools.mem_tracker.MemTracker (not the planner's own counter): two steps of
torch's fused AdamW (its state exists from the second), the EMA's update where use_ema is on.
It cannot run bitsandbytes' 8-bit kernels, so it checks the AdamW configs only, nor LoRA (MemTracker
refuses frozen weights that run with gradients on).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dbnb.core.config import Config  # noqa: E402
from dbnb.train.memory import PRIOR, PUBLISHED, choose, settings_text  # noqa: E402
from dbnb.train.planner import CARDS, GIB, SHIPPED, card, plan, step_trace, store, trace_key  # noqa: E402

# The settings whose traces dbnb ships: the defaults and what memory_profile=auto tries on them,
# the person preset, LoRA, and the published rows' settings.
AUTO_TRIES = [dict(mixed_precision=p, gradient_checkpointing=c) for p in ("fp16", "bf16") for c in (True, False)]
SHIPPED_SETTINGS = ([{}] + AUTO_TRIES + [dict(a, use_lora=True) for a in AUTO_TRIES]
                    + [dict(a, **PRIOR) for a in AUTO_TRIES]
                    + [dict(mixed_precision="no", gradient_checkpointing=c) for c in (True, False)]
                    + [p.config for p in PUBLISHED if p.config is not None])
# SDXL 1.0's size (the shipped skeleton) at 1024 px: what memory_profile=auto tries for LoRA on a T4
# (fp16) or a bf16 card, and for a full fine-tune (the UNet alone, or with both text encoders) on a 40 GB one.
SDXL = {"pretrained_model_name_or_path": str(ROOT / "dbnb" / "assets" / "sdxl"), "resolution": 1024}
SDXL_SETTINGS = ([dict(SDXL, use_lora=True, mixed_precision=p, gradient_checkpointing=c, cache_latents=cached)
                  for p in ("fp16", "bf16") for c in (True, False) for cached in (True, False)]
                 + [dict(SDXL, use_lora=False, train_text_encoder=te, mixed_precision="bf16", gradient_checkpointing=c,
                         cache_latents=cached) for te in (False, True) for c in (True, False) for cached in (True, False)])


def reference_peak(config: Config, steps: int = 2) -> float:
    """Peak bytes of `config`'s whole step (step 2: optimizer state present) under MemTracker."""
    from diffusers.training_utils import EMAModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from dbnb.family.sd1.family import SD1
    from dbnb.family.sd1.memory import empty_parts
    from dbnb.core.precision import mixed_dtype

    dtype = mixed_dtype(config.mixed_precision)
    parts = empty_parts(config, dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # With cached latents the autoencoder has left the device before training: it stays on meta.
        for part in (parts.denoiser, parts.encoder) + (() if config.cache_latents else (parts.autoencoder,)):
            part.to_empty(device="cpu")
        trained = [p for m in (parts.denoiser, parts.encoder) for p in m.parameters() if p.requires_grad]
        # MemTracker hooks every weight a module runs with and refuses frozen ones; the frozen parts run
        # under no_grad and outside autocast, where requires_grad changes nothing they allocate.
        for part in (parts.encoder, parts.autoencoder):
            part.requires_grad_(True)
        optimizer = torch.optim.AdamW(trained, lr=1e-6, fused=True)
        tracker = MemTracker()
        tracker.track_external(parts.denoiser, parts.encoder, parts.autoencoder, optimizer)
        rows = config.train_batch_size * (2 if config.with_prior_preservation else 1)
        side = config.resolution // parts.latent_factor
        mixed = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with tracker:
            ema = EMAModel(trained, foreach=True) if config.use_ema else None
            for step in range(steps):
                if step:
                    tracker.reset_mod_stats()
                if config.cache_latents:
                    latents = torch.randn(rows, parts.latent_channels, side, side)
                else:
                    pictures = torch.randn(rows, 3, config.resolution, config.resolution)
                    latents = SD1.encode_images(parts.autoencoder, pictures).sample()
                with torch.set_grad_enabled(config.trains_text_encoder), \
                        (mixed if config.trains_text_encoder else contextlib.nullcontext()):
                    hidden = SD1.encode_prompts(parts.encoder, {"input_ids": torch.zeros(rows, 77, dtype=torch.long)})
                with mixed:
                    pred = SD1.predict(parts.denoiser, torch.randn_like(latents), torch.zeros(rows, dtype=torch.long),
                                       hidden).float()
                torch.nn.functional.mse_loss(pred, latents.float()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(trained)
        peak = tracker.get_tracker_snapshot("peak")
    return max(device["Total"] for device in peak.values())


def published_rows() -> list[dict]:
    rows = []
    for p in PUBLISHED:
        row = {"source": p.source, "gpu": p.gpu, "settings": p.settings, "published_gb": p.vram_gb, "note": p.note}
        if p.config is not None:
            predicted = plan(Config(**p.config)).vram_gib * GIB / 1e9
            row.update(predicted_gb=round(predicted, 2), ratio=round(predicted / p.vram_gb, 3))
        rows.append(row)
    return rows


def auto_rows() -> list[dict]:
    """What memory_profile=auto chooses for the default settings on each card dbnb knows."""
    rows = []
    for name in CARDS:
        gpu = card(name)
        choice = choose(Config(), gpu)
        rows.append({"card": name, "total_gib": gpu["total_vram_gib"], "settings": settings_text(choice.settings),
                     "predicted_gib": round(choice.predicted_gib, 2), "fits": choice.fits})
    return rows


def cli_seconds() -> float:
    """Wall time of `dbnb plan` on the default config, as a user runs it (a fresh process)."""
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "config.yaml"
        config.write_text("{}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DBNB_CACHE": folder}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dbnb", "plan", str(config), "--card", "T4"], check=True, env=env,
                       capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=int, metavar="PX", help="also run the MemTracker reference at PX")
    parser.add_argument("--write", action="store_true", help="trace SHIPPED_SETTINGS into the shipped cache")
    parser.add_argument("--record", metavar="DOCS", help="write DOCS/cpu-results/plan.json")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, no GPU needed")
    if args.write:
        traces = {}
        for settings in SHIPPED_SETTINGS + SDXL_SETTINGS:
            config = Config(**settings)
            started = time.perf_counter()
            traces[trace_key(config)] = step_trace(config, cache=False)
            print(f"traced {settings or 'the defaults'} in {time.perf_counter() - started:.1f} s", flush=True)
        SHIPPED.unlink(missing_ok=True)
        store(SHIPPED, traces)
        print(f"written: {SHIPPED} ({len(traces)} traces)")
    answered = round(cli_seconds(), 1)
    print(f"`dbnb plan` on the default config, a fresh process: {answered} s")
    rows = published_rows()
    print("\n| source | GPU | settings | published GB | predicted GB | predicted / published |")
    for r in rows:
        print(f"| {r['source']} | {r['gpu']} | {r['settings']} | {r['published_gb']} | {r.get('predicted_gb', '-')} "
              f"| {r.get('ratio', '-')} |")
    references = []
    if args.reference:
        for settings in ({"use_8bit_adam": False}, {"use_8bit_adam": False, "gradient_checkpointing": False}):
            config = Config(resolution=args.reference, **settings)
            started = time.perf_counter()
            reference = reference_peak(config)
            seconds = time.perf_counter() - started
            predicted = plan(config, step_trace(config, cache=False)).allocated
            print(f"{args.reference} px {settings}: planner {predicted / GIB:.3f} GiB allocated, MemTracker reference "
                  f"{reference / GIB:.3f} GiB ({seconds:.0f} s): ratio {predicted / reference:.3f}", flush=True)
            references.append({"resolution": args.reference, "settings": settings_text(settings),
                               "planner_gib": round(predicted / GIB, 3), "reference_gib": round(reference / GIB, 3),
                               "reference_s": round(seconds)})
    if args.record:
        out = Path(args.record) / "cpu-results" / "plan.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        machine = f"a {os.cpu_count()}-core CPU box without a GPU, torch {torch.__version__}"
        out.write_text(json.dumps({"kind": "plan", "machine": machine, "seconds": answered, "published": rows,
                                   "auto": auto_rows(), "reference": references},
                                  indent=1, ensure_ascii=False) + "\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
