"""Cached text embeddings (cache_text_embeddings): the memory the training steps need, with and without.

    python bench/bench_text_cache.py          # the tiny SDXL (tests' model): seconds on a CPU
    python bench/bench_text_cache.py --mid    # SDXL's text-encoder widths (CLIP-L 768, bigG 1280), 12 layers each

Each side runs in its own process: dbnb's own set-up (dbnb.train.loop.setup: LoRA on the UNet, text
encoders frozen, latents cached), then `--steps` optimizer steps of the loop's own optimizer_step.
Printed for each side:
- the steps' working set, what a GPU must hold while they run: the weights of every part the steps
  run (a forward hook on every module says which parts ran) plus the peak bytes of the tensors the
  steps make beyond the weights (dbnb.train.steptrace.LiveBytes: activations, gradients, optimizer state);
- the process's peak RSS: on a CPU the parked encoders stay in the same RAM, so it barely moves;
- on a CUDA GPU, torch.cuda.max_memory_allocated over the steps: the figure itself.

Measured on a 2-core x86_64 CPU, no GPU, torch 2.13.0+cpu (2026-12-06), working set off -> on:
tiny SDXL (UNet 4.8 MiB with LoRA, encoders 9.2 MiB) 14.6 -> 5.4 MiB, peak RSS 571 / 566 MiB;
--mid (encoders 1203.7 MiB, UNet 10.6 MiB) 1225.4 -> 13.0 MiB, peak RSS 1412 / 1400 MiB. On a CPU
the parked encoders stay in the same RAM, so the RSS does not move: the win is on the GPU.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

MIB = 2 ** 20


def model_folder(mid: bool, cache: Path) -> Path:
    from dbnb.world.tiny_sdxl import make_tiny_sdxl

    folder = cache / ("sdxl-mid" if mid else "sdxl-tiny")
    if (folder / "model_index.json").exists():
        return folder
    return make_tiny_sdxl(folder, widths=(768, 1280), text_layers=12) if mid else make_tiny_sdxl(folder)


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def one_side(args, cached: bool) -> dict:
    """Set up a run, then `args.steps` optimizer steps; the figures of one side."""
    from accelerate import Accelerator
    from torch.nn.modules.module import register_module_forward_hook

    from dbnb.core.config import Config
    from dbnb.train.loop import optimizer_step, setup
    from dbnb.train.steptrace import LiveBytes
    from dbnb.world.demo import write_dataset

    cache, gpu = Path(args.cache), torch.cuda.is_available()
    instance, _ = write_dataset(cache / "data", n_instance=5, size=args.resolution)
    config = Config(pretrained_model_name_or_path=str(model_folder(args.mid, cache)),
                    instance_data_dir=str(instance), instance_prompt="hnzk girl", resolution=args.resolution,
                    output_dir=str(cache / "runs"), run_name=f"{'cached' if cached else 'live'}-{args.mid}",
                    max_train_steps=args.steps, save_every_steps=0, sample_every_steps=0, lr_warmup_steps=0,
                    mixed_precision="fp16" if gpu else "no", use_8bit_adam=False, gradient_checkpointing=True,
                    use_lora=True, lora_rank=4, lora_text_encoder_rank=0, train_text_encoder=False,
                    cache_text_embeddings=cached)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not gpu)
    session = setup(config, accelerator, None, progress=False)
    parts = {"denoiser": session.models.denoiser, "encoder": session.models.encoder,
             "autoencoder": session.models.autoencoder}
    owner = {id(m): name for name, part in parts.items() for m in part.modules()}
    ran: set[str] = set()
    hook = register_module_forward_hook(lambda module, inputs, out: ran.add(owner.get(id(module), "")))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with LiveBytes() as made:
        made.hold(t for part in parts.values() for t in (*part.parameters(), *part.buffers()))
        held = made.reset_peak()
        for _ in range(args.steps):
            optimizer_step(session)
    hook.remove()
    ran.discard("")
    figures = {"ran": sorted(ran), "weights": sum(weight_bytes(parts[name]) for name in ran),
               "step_peak": made.peak - held, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "sizes": {name: weight_bytes(part) for name, part in parts.items()}}
    if gpu:
        figures["cuda_peak"] = torch.cuda.max_memory_allocated()
    accelerator.end_training()
    return figures


def line(name: str, f: dict) -> str:
    said = (f"{name}: the steps ran {', '.join(f['ran'])}: weights {f['weights'] / MIB:.1f} MiB + step peak "
            f"{f['step_peak'] / MIB:.1f} MiB = {(f['weights'] + f['step_peak']) / MIB:.1f} MiB; "
            f"peak RSS {f['peak_rss'] / MIB:.0f} MiB")
    return said + (f"; CUDA peak allocated {f['cuda_peak'] / MIB:.1f} MiB" if "cuda_peak" in f else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mid", action="store_true", help="SDXL's text-encoder widths, 12 layers each")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-bench-text-cache"))
    parser.add_argument("--side", choices=("live", "cached"), help=argparse.SUPPRESS)  # one side, as JSON
    args = parser.parse_args()
    if args.side:
        print(json.dumps(one_side(args, args.side == "cached")))
        return 0
    import shutil

    shutil.rmtree(Path(args.cache) / "runs", ignore_errors=True)
    model_folder(args.mid, Path(args.cache))  # built once, before either side times anything
    sides = {}
    for side in ("live", "cached"):
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], capture_output=True,
                              text=True)
        if done.returncode:
            raise SystemExit(f"the {side} side failed:\n{done.stderr[-3000:]}")
        sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    sizes = sides["live"]["sizes"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{'mid-size' if args.mid else 'tiny'} SDXL: UNet {sizes['denoiser'] / MIB:.1f} MiB (with LoRA), text "
          f"encoders {sizes['encoder'] / MIB:.1f} MiB, VAE {sizes['autoencoder'] / MIB:.1f} MiB; "
          f"{args.resolution} px, batch 1, {args.steps} steps; {device}, torch {torch.__version__}")
    for side in ("live", "cached"):
        print(line(f"cache_text_embeddings={'true' if side == 'cached' else 'false'}", sides[side]))
    live, cached = (sides[s]["weights"] + sides[s]["step_peak"] for s in ("live", "cached"))
    print(f"the steps' working set: {live / MIB:.1f} -> {cached / MIB:.1f} MiB ({(live - cached) / MIB:.1f} MiB, "
          f"{100 * (live - cached) / live:.0f}% less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
