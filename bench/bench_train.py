"""Training speed and memory: steps/s after a warm-up, peak (V)RAM, through dbnb.train.loop.train.

    python bench/bench_train.py                      # tiny model on this machine (CPU: seconds)
    python bench/bench_train.py --model sd15 --resolution 512 --steps 40 --warmup 10 \\
        mixed_precision=fp16 use_8bit_adam=true gradient_checkpointing=true   # a GPU

    python bench/bench_train.py --vs-lora            # full fine-tuning vs LoRA, each in its own process
    python bench/bench_train.py --vs-lora --model sd15 --resolution 512 --steps 40 --warmup 10 \
        mixed_precision=fp16 use_8bit_adam=true gradient_checkpointing=true   # the same on a GPU

`--model sd15` builds a full-size SD 1.5 architecture with random weights from the shipped
config (no download; CUDA only: on a CPU it would take hours). Any Config setting can follow as
key=value; `--vs-lora` adds LORA_SETTINGS to the second run and prints LoRA / full.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def model_folder(kind: str, cache: Path) -> Path:
    from dbnb.world.tiny import make_full_size_model, make_tiny_model

    folder = cache / f"model-{kind}"
    if (folder / "model_index.json").exists():
        return folder
    return make_tiny_model(folder) if kind == "tiny" else make_full_size_model(folder)


def steps_per_second(times: list[float], warmup: int) -> float:
    """Steps per second after the first `warmup` steps, from the train log's per-step times."""
    timed = times[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 and timed[-1] > timed[0] else float("nan")


# The LoRA side of --vs-lora: the extension's defaults (rank 32, UNet only), its usual rate.
# On the tiny model (32-64 channels) rank-32 adapters hold as many weights as the 192 layers
# they adapt (753,664 vs 741,376), so each adapted matmul costs about twice its own again and
# LoRA steps slower there (measured 0.68x on 2 CPU cores; rank 4: 1.00x). On SD 1.5 (320-1280
# channels) rank 32 is a few % of those layers.
LORA_SETTINGS = ["use_lora=true", "lora_rank=32", "lora_learning_rate=1e-4"]


def vs_lora(argv: list[str]) -> int:
    """Full fine-tuning, then LoRA, each in a fresh process (peak RSS / VRAM are per process)."""
    results = {}
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # after LORA_SETTINGS: they win
    options = [a for a in argv if a not in overrides]
    for name, extra in (("full", []), ("lora", LORA_SETTINGS)):
        out = subprocess.run([sys.executable, __file__, *options, "--json", *extra, *overrides], check=True,
                             capture_output=True, text=True).stdout
        print(f"--- {name}\n" + out.rsplit("\n", 2)[0])
        results[name] = json.loads(out.strip().splitlines()[-1])
    full, lora = results["full"], results["lora"]
    print(f"LoRA / full: steps/s x{lora['steps_per_s'] / full['steps_per_s']:.2f}, "
          f"peak RSS x{lora['peak_rss_gib'] / full['peak_rss_gib']:.2f}"
          + (f", peak VRAM x{lora['peak_vram_gib'] / full['peak_vram_gib']:.2f}" if full.get("peak_vram_gib") else ""))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-bench-train"))
    parser.add_argument("--vs-lora", action="store_true", help="full fine-tuning vs LoRA, and their ratio")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.vs_lora:
        return vs_lora([a for a in sys.argv[1:] if a != "--vs-lora"])
    if args.model == "sd15" and not torch.cuda.is_available():
        parser.error("--model sd15 needs a CUDA GPU (a full-size SD 1.5 step on a CPU takes minutes)")

    from dbnb.core.config import load_config
    from dbnb.prep.classimages import write_blank_images
    from dbnb.train.loop import train
    from dbnb.world.demo import write_dataset

    cache = Path(args.cache)
    resolution = args.resolution or (64 if args.model == "tiny" else 512)
    model = model_folder(args.model, cache)
    instance, klass = write_dataset(cache / f"data-{resolution}", n_instance=5, size=resolution)
    write_blank_images(klass, 5 * 2, resolution, progress=False)  # transparent: a quick stand-in
    gpu = torch.cuda.is_available()
    defaults = [f"pretrained_model_name_or_path={model}", f"instance_data_dir={instance}",
                f"class_data_dir={klass}", "instance_prompt=hnzk girl", f"resolution={resolution}",
                f"max_train_steps={args.steps}", "save_every_steps=0", f"output_dir={cache / 'runs'}",
                f"run_name=bench-{int(time.time())}", "lr_warmup_steps=0"]
    if not gpu:
        defaults += ["mixed_precision=no", "use_8bit_adam=false"]
    config = load_config(overrides=defaults + args.overrides)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    result = train(config, progress=False)
    times = [json.loads(line)["time"] for line in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    rate = steps_per_second(times, args.warmup)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model} @ {resolution}px, batch {config.train_batch_size}, {device}, torch {torch.__version__}")
    print(f"settings: mixed_precision={config.mixed_precision} optimizer={config.optimizer} "
          f"use_8bit_adam={config.use_8bit_adam} gradient_checkpointing={config.gradient_checkpointing} "
          f"attention={config.attention} cache_latents={config.cache_latents} "
          f"train_text_encoder={config.train_text_encoder} use_lora={config.use_lora}"
          + (f" lora_rank={config.lora_rank} lora_conv_rank={config.lora_conv_rank} "
             f"lora_text_encoder_rank={config.lora_text_encoder_rank}" if config.use_lora else ""))
    print(f"{rate:.2f} steps/s over steps {args.warmup + 1}-{len(times)}")
    figures = {"steps_per_s": rate, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if gpu:
        figures["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak VRAM allocated {figures['peak_vram_gib']:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    print(f"peak RSS {figures['peak_rss_gib']:.2f} GiB")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
