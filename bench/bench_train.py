"""Training speed and memory: steps/s after a warm-up, peak (V)RAM, through dbnb.train.train.

    python bench/bench_train.py                      # tiny model on this machine (CPU: seconds)
    python bench/bench_train.py --model sd15 --resolution 512 --steps 40 --warmup 10 \\
        mixed_precision=fp16 use_8bit_adam=true gradient_checkpointing=true   # a GPU

`--model sd15` builds a full-size SD 1.5 architecture with random weights from the shipped
config (no download). Any Config setting can follow as key=value.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def model_folder(kind: str, cache: Path) -> Path:
    from dbnb.tiny import make_full_size_model, make_tiny_model

    folder = cache / f"model-{kind}"
    if (folder / "model_index.json").exists():
        return folder
    return make_tiny_model(folder) if kind == "tiny" else make_full_size_model(folder)


def steps_per_second(times: list[float], warmup: int) -> float:
    """Steps per second after the first `warmup` steps, from the train log's per-step times."""
    timed = times[warmup:]
    return (len(timed) - 1) / (timed[-1] - timed[0]) if len(timed) > 1 and timed[-1] > timed[0] else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-bench-train"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from dbnb.config import load_config
    from dbnb.classimages import write_blank_images
    from dbnb.demo import write_dataset
    from dbnb.train import train

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
    print(f"settings: mixed_precision={config.mixed_precision} use_8bit_adam={config.use_8bit_adam} "
          f"gradient_checkpointing={config.gradient_checkpointing} attention={config.attention} "
          f"cache_latents={config.cache_latents} train_text_encoder={config.train_text_encoder}")
    print(f"{rate:.2f} steps/s over steps {args.warmup + 1}-{len(times)}")
    if gpu:
        print(f"peak VRAM allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, "
              f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
