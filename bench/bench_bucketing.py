"""Aspect-ratio bucketing's cost: steps/s and peak memory with bucketing off and on, on one set
of square, tall and wide pictures, each run in its own process through bench/bench_train.py.

    python bench/bench_bucketing.py                   # tiny model on this machine (CPU)
    python bench/bench_bucketing.py --model sd15 --resolution 512 --steps 40 --warmup 10 \\
        mixed_precision=fp16 use_8bit_adam=true gradient_checkpointing=true   # a GPU

Off, every picture is squeezed to resolution²; on, each trains at its bucket (about the same
area, so the work per step should stay about the same; what changes is that steps alternate
between shapes). Any Config setting can follow as key=value, for both runs.

Measured on a shared 2-core CPU box (tiny model, 64 px, one thread, 60 steps, 10 warm-up):
batch 1: 3.81 steps/s off, 3.94 on (x1.03); batch 2: 2.95 off, 2.88 on (x0.98); peak RSS
0.58-0.59 GiB either way. Within this box's noise: bucketing costs no speed or memory here.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_TRAIN = Path(__file__).with_name("bench_train.py")


def shapes(resolution: int) -> list[tuple[int, int]]:
    """Two square, two tall (2:3.. 1:2) and two wide pictures, a little larger than the resolution."""
    r = resolution
    return [(r, r), (r * 5 // 4, r * 5 // 4), (r * 3 // 4, r * 3 // 2), (r * 2 // 3, r * 4 // 3),
            (r * 3 // 2, r * 3 // 4), (r * 4 // 3, r * 2 // 3)]


def write_pictures(folder: Path, resolution: int) -> Path:
    from dbnb.world.demo import draw_character

    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(shapes(resolution)):
        draw_character(i, max(size)).resize(size).save(folder / f"{i:03d}.png")
    return folder


def run(options: list[str], overrides: list[str]) -> tuple[str, dict]:
    out = subprocess.run([sys.executable, str(BENCH_TRAIN), *options, "--json", *overrides], check=True,
                         capture_output=True, text=True).stdout
    return out.rsplit("\n", 2)[0], json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-bench-bucketing"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    resolution = args.resolution or (64 if args.model == "tiny" else 512)
    pictures = write_pictures(Path(args.cache) / f"shapes-{resolution}", resolution)
    options = ["--model", args.model, "--resolution", str(resolution), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--cache", args.cache]
    results = {}
    for name in ("off", "on"):
        text, results[name] = run(options, [f"instance_data_dir={pictures}", f"bucketing={name == 'on'}",
                                            *args.overrides])
        print(f"--- bucketing {name}\n{text}")
    off, on = results["off"], results["on"]
    print(f"bucketing on / off: steps/s x{on['steps_per_s'] / off['steps_per_s']:.2f}, "
          f"peak RSS x{on['peak_rss_gib'] / off['peak_rss_gib']:.2f}"
          + (f", peak VRAM x{on['peak_vram_gib'] / off['peak_vram_gib']:.2f}" if off.get("peak_vram_gib") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
