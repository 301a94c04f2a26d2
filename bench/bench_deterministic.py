"""What `deterministic=true` costs on this CPU, and what it buys (issue 36), printed as figures.

    python bench/bench_deterministic.py                  # about 7 minutes on 2 cores
    python bench/bench_deterministic.py --pairs 1 --skip-demo
    python bench/bench_deterministic.py --record         # docs/cpu-results/ and docs/performance.md
    python bench/bench_deterministic.py --record --skip-demo   # the tiny runs again, the day's demo kept

Runs at the machine's default thread count (nothing here pins threads), alternating off and on so
a slow spell of the machine falls on both:
- the demo's training as a user starts it: `dbnb train` in a process of its own on the demo's
  config (world model, 400 steps, batch 2 + prior preservation, text encoder trained, previews),
  whole-process seconds and steps/s over the loop after its warm-up;
- the tiny model at 64 px, batch 1, AdamW, fp32, text encoder trained (the default; issue 36's case: batch 1 is where the CPU's
  backward is not reproducible), in this process, steps/s after the warm-up;
and for each, the largest difference between the fp32 master UNet weights of two runs of one config.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # hot_path's tiny run
NOTE = (
    "The cause (dbnb/train/reproducible.py): at batch 1 the UNet's 3x3 convolutions on its 1x1 lowest level run the "
    "slow_conv2d path (not oneDNN), whose input gradient is one MKL sgemm; on two or more threads MKL splits it "
    "differently from call to call (~1e-7), and Adam amplifies that (issue 36's UNet-only run: 1.2e-3 apart "
    "after 20 steps; with the text encoder trained, the default now, the table's 6e-6 after 100). At batch 2 and "
    "more that convolution parallelises over the batch and comes out reproducible, which is why the demo's two "
    "runs can be equal with it off. `torch.use_deterministic_algorithms(True)` and "
    "`torch.backends.mkldnn.enabled = False` leave it; `MKL_CBWR=AUTO,STRICT` cures it only when set before the "
    "process's first MKL call, so `deterministic` runs backward on one thread instead. Not measured here: the "
    "cost at SD 1.5 size on a CPU, and any GPU figure (bench/gpu_suite.py's `deterministic` extra measures it).")


def max_difference(a_dir: Path, b_dir: Path) -> float:
    from dbnb.run.checkpoints import master_state
    from dbnb.run.folder import RunFolder

    a, b = (master_state(RunFolder(d).checkpoints()[-1], "unet") for d in (a_dir, b_dir))
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def loop_speed(run_dir: Path, warmup: int) -> float:
    times = [json.loads(x)["time"] for x in (run_dir / "logs" / "train.jsonl").read_text().splitlines()][warmup:]
    return (len(times) - 1) / (times[-1] - times[0])


def tiny_runs(cache: Path, pairs: int, steps: int, warmup: int) -> dict:
    from hot_path import tiny_config

    from dbnb.train.loop import train

    base = tiny_config(cache, steps, seed=7, sample_every_steps=0, train_batch_size=1)
    out = {"off": {"steps_per_s": [], "runs": []}, "on": {"steps_per_s": [], "runs": []}}
    for pair in range(pairs):
        for mode in ("off", "on"):
            result = train(base.replace(deterministic=mode == "on", run_name=f"tiny-{mode}-{pair}-{time.time_ns()}"),
                           progress=False)
            out[mode]["steps_per_s"].append(loop_speed(result.run_dir, warmup))
            out[mode]["runs"].append(result.run_dir)
            print(f"tiny, deterministic {mode}, pair {pair + 1}: {out[mode]['steps_per_s'][-1]:.2f} steps/s", flush=True)
    return finish(out)


def demo_runs(cache: Path, pairs: int, warmup: int) -> dict:
    from dbnb.world.demo import DEMO_STEPS, demo_config, prepare_world

    out_dir = cache / "demo"
    prepare_world(out_dir, demo_config(out_dir, DEMO_STEPS))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = {"off": {"process_s": [], "steps_per_s": [], "runs": []}, "on": {"process_s": [], "steps_per_s": [], "runs": []}}
    for pair in range(pairs):
        for mode in ("off", "on"):
            config = demo_config(out_dir, DEMO_STEPS, deterministic=mode == "on",
                                 run_name=f"demo-{mode}-{pair}-{time.time_ns()}")
            path = config.save(cache / f"{config.run_name}.json")
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "dbnb", "train", str(path), "--no-progress"],
                                  capture_output=True, text=True, env=env)
            seconds = time.perf_counter() - started
            if done.returncode:
                sys.exit(f"bench_deterministic: the demo's training failed:\n{done.stderr[-3000:]}")
            run_dir = Path(config.output_dir) / config.run_name
            out[mode]["process_s"].append(seconds)
            out[mode]["steps_per_s"].append(loop_speed(run_dir, warmup))
            out[mode]["runs"].append(run_dir)
            print(f"demo, deterministic {mode}, pair {pair + 1}: {seconds:.1f} s whole process, "
                  f"{out[mode]['steps_per_s'][-1]:.2f} steps/s after step {warmup}", flush=True)
    return finish(out)


def finish(out: dict) -> dict:
    """Two runs of one config compared, then the run folders dropped from the figures."""
    for mode in out.values():
        runs = mode.pop("runs")
        mode["max_weight_difference"] = max_difference(runs[0], runs[1]) if len(runs) > 1 else None
    return out


def record(figures: dict, date: str) -> Path:
    """docs/cpu-results/deterministic-<date>.json, then docs/performance.md again."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_report import write_doc

    out = ROOT / "docs" / "cpu-results" / f"deterministic-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if "demo" not in figures and out.exists():  # a --skip-demo rerun keeps the day's demo figures
        figures = {**figures, "demo": json.loads(out.read_text())["demo"]}
    out.write_text(json.dumps({**figures, "notes": [NOTE]}, indent=1) + "\n")
    return write_doc(ROOT / "docs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="off / on pairs of each run (default 2)")
    parser.add_argument("--tiny-steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of steps/s")
    parser.add_argument("--demo-warmup", type=int, default=100)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--record", action="store_true", help="write docs/cpu-results/deterministic-DATE.json "
                        "and docs/performance.md")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    import torch

    cache = Path(tempfile.mkdtemp(prefix="dbnb-bench-deterministic-"))
    machine = {"cpu": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU", "date": args.date,
               "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"torch {torch.__version__}, {machine['threads']} CPU threads, {args.pairs} off / on pairs", flush=True)
    figures = {"kind": "deterministic", "machine": machine, "pairs": args.pairs,
               "tiny": {"steps": args.tiny_steps, "warmup": args.warmup,
                        **tiny_runs(cache, args.pairs, args.tiny_steps, args.warmup)}}
    if not args.skip_demo:
        from dbnb.world.demo import DEMO_STEPS
        figures["demo"] = {"steps": DEMO_STEPS, "warmup": args.demo_warmup,
                           **demo_runs(cache, args.pairs, args.demo_warmup)}
    for name in ("tiny", "demo"):
        for mode in ("off", "on"):
            if name in figures and figures[name][mode]["max_weight_difference"] is not None:
                print(f"{name}, deterministic {mode}: two runs differ by at most "
                      f"{figures[name][mode]['max_weight_difference']:.3g}")
    if args.record:
        print(f"wrote {record(figures, args.date)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
