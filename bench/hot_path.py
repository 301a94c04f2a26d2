"""The training step's hot path (issue 29, item 9): host reads per optimizer step, steps/s, RAM
held by the pictures, and the pre-save finiteness scan, printed as figures.

    python bench/hot_path.py                       # tiny model (CPU: about a minute) + SD 1.5 scan
    python bench/hot_path.py --code /path/to/other/checkout   # the same figures for another dbnb
    python bench/hot_path.py --skip-sd15 --steps 60
    python bench/hot_path.py --code /work/main --skip-sd15 --json | tail -1 > before.json
    python bench/hot_path.py --record before.json      # docs/cpu-results/ and docs/performance.md

`--code` imports dbnb from another checkout (e.g. main's worktree), so before / after figures come
from the same script on the same machine. Host reads are counted by wrapping Tensor.item /
tolist / __float__ / __bool__ / ... and torch.cuda.synchronize (the real methods run); reads of
each epoch's shuffle (a CPU generator's randperm, never a device value) are not counted. The
SD 1.5 scan builds SD 1.5's UNet with random weights from dbnb's shipped config, gives it AdamW's
state (two fp32 tensors per weight, as after a first step) and times the scan before issue 29
(written out below) against dbnb.train.divergence.first_non_finite.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
COUNT = {"on": False, "reads": 0}  # the wrappers' counter, installed once
NOTES = [
    "Host reads are counted on a CPU, where a host tensor and a device tensor cannot be told apart: two of the "
    "reads counted before issue 29 are `bool()` of each pick's flip draw in the data path (a host tensor, no "
    "GPU wait); the rest (per micro-step: the loss check; per step: the gradient norm and `loss.item()`) wait "
    "for the GPU. After: one read per optimizer step, of loss, gradient norm and stop flags together.",
    "steps/s is unchanged on a CPU, as expected: a host read costs nothing where the host computes. The gain is "
    "on a GPU (no GPU was lent to this measurement, so none is claimed). The pre-save scan figure is this "
    "machine's; issue 29's 138 s was measured on another one.",
]


def count_host_reads(state: dict) -> None:
    """Wrap every host read of a tensor value (once per process); counted into state["reads"]
    while state["on"]."""
    import torch

    def counting(name, real):
        def read(*args, **kwargs):
            if state["on"] and sys._getframe(1).f_code.co_name != "epoch_order":
                state["reads"] += 1
            return real(*args, **kwargs)
        return read
    for name in READS:
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counting("synchronize", torch.cuda.synchronize)


def tiny_config(cache: Path, steps: int, **settings):
    """The tiny model (made once in `cache`) on 5 drawn pictures and 10 blank class images at
    64 px, fp32 and torch AdamW, `steps` steps with no saves between: the bench scripts' CPU run."""
    from dbnb.core.config import Config
    from dbnb.prep.classimages import write_blank_images
    from dbnb.world.demo import write_dataset
    from dbnb.world.tiny import make_tiny_model

    model = cache / "tiny"
    if not (model / "model_index.json").exists():
        make_tiny_model(model)
    instance, klass = write_dataset(cache / "data-64", n_instance=5, size=64)
    write_blank_images(klass, 10, 64, progress=False)
    return Config(**{**dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance),
                            class_data_dir=str(klass), instance_prompt="hnzk girl", class_prompt="girl",
                            output_dir=str(cache / "runs"), run_name=f"hot-{time.time_ns()}", resolution=64,
                            max_train_steps=steps, save_every_steps=0, lr_warmup_steps=0, mixed_precision="no",
                            use_8bit_adam=False, gradient_checkpointing=False), **settings})


def tiny_run(cache: Path, steps: int, warmup: int, settings: dict) -> dict:
    """Train the tiny model `steps` steps; host reads per step and steps/s after `warmup`."""
    from dbnb.train import loop as train_module

    config = tiny_config(cache, steps, **settings)
    state, seen = COUNT, {}
    state.update(on=False, reads=0)
    real_loop = train_module.loop
    train_module.loop = lambda s, *a, **k: real_loop(seen.setdefault("s", s), *a, **k)

    def window(record):
        state["on"] = warmup <= record["step"] < steps
    try:
        result = train_module.train(config, progress=False, on_step=window)
    finally:
        train_module.loop = real_loop
    times = [json.loads(x)["time"] for x in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    timed = times[warmup:]
    held = seen["s"].batches.instance.images
    return {"reads_per_step": state["reads"] / (steps - warmup),
            "steps_per_s": (len(timed) - 1) / (timed[-1] - timed[0]),
            "pictures_held_while_training": "freed" if held is None else
            f"kept ({held.nbytes / len(held) / 2**10:.0f} KiB each at 64 px)"}


def picture_ram(cache: Path, n: int, resolution: int) -> float:
    """MiB the training set holds per 100 pictures at `resolution` (before any latent cache)."""
    from transformers import CLIPTokenizer

    from dbnb.core.config import Config
    from dbnb.data.batches import read_images
    from dbnb.family.sd1.skeleton import SKELETON
    from dbnb.world.demo import write_dataset

    instance, _ = write_dataset(cache / f"data-{resolution}", n_instance=n, size=resolution)
    config = Config(instance_data_dir=str(instance), instance_prompt="hnzk girl", resolution=resolution,
                    with_prior_preservation=False)
    images = read_images(config, CLIPTokenizer.from_pretrained(SKELETON / "tokenizer")).instance.images
    return images.nbytes / len(images) * 100 / 2**20


def old_scan(parts: dict) -> str:
    """The pre-save scan before issue 29: a bool copy of every tensor, one host read per part."""
    import torch

    for name, tensors in parts.items():
        if tensors and not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            return name
    return ""


def sd15_scan(repeat: int) -> dict:
    """Seconds of each scan over SD 1.5's UNet weights and AdamW state (random, fp32, CPU)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dbnb.family.sd1.skeleton import skeleton_config
    from dbnb.train.divergence import first_non_finite

    started = time.perf_counter()
    unet = UNet2DConditionModel(**{k: v for k, v in skeleton_config("unet").items() if not k.startswith("_")})
    weights = [p.detach() for p in unet.parameters()]
    state = [t for p in weights for t in (torch.zeros_like(p), torch.rand_like(p))]  # exp_avg, exp_avg_sq
    parts = {"UNet weights": weights, "optimizer state": state}
    built = time.perf_counter() - started
    out = {"weights": sum(p.numel() for p in weights), "state_tensors": len(state), "build_s": built}
    for name, scan in (("old_s", old_scan), ("fused_s", first_non_finite)):
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            assert scan(parts) == ""
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


def code_label(folder: Path) -> str:
    """The measured checkout as git names it: branch and commit (+ "with changes" when dirty)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True).stdout.strip()
    dirty = " with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{git('rev-parse', '--abbrev-ref', 'HEAD') or folder} {git('rev-parse', '--short', 'HEAD')}{dirty}"


def record(before_file: str, after: dict, date: str) -> Path:
    """docs/cpu-results/hot-path-<date>.json from the two runs, then docs/performance.md again."""
    import os
    import platform

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_report import write_doc

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    machine = {"cpu": f"{platform.machine()} CPU, {os.cpu_count()} cores, {gpu}", "date": date,
               "python": platform.python_version(), "torch": torch.__version__}
    result = {"machine": machine, "before": json.loads(Path(before_file).read_text()), "after": after, "notes": NOTES}
    out = ROOT / "docs" / "cpu-results" / f"hot-path-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return write_doc(ROOT / "docs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose dbnb is measured")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pictures", type=int, default=20, help="512 px pictures read for the RAM figure")
    parser.add_argument("--repeat", type=int, default=2, help="timings of each SD 1.5 scan (the best is kept)")
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--record", metavar="BEFORE_JSON", help="with this run as 'after': write "
                        "docs/cpu-results/hot-path-DATE.json and docs/performance.md")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()))
    import torch

    import dbnb

    count_host_reads(COUNT)
    cache = Path(tempfile.gettempdir()) / "dbnb-bench-hot-path"
    print(f"dbnb from {Path(dbnb.__file__).parent}, torch {torch.__version__}, "
          f"CPU threads {torch.get_num_threads()}, CUDA {torch.cuda.is_available()}")
    figures = {"code": code_label(Path(args.code)), "steps": args.steps, "warmup": args.warmup, "tiny": {}}
    for name, settings in (("full", dict(use_ema=True, max_grad_norm=1.0)),
                           ("full + accumulation 2", dict(use_ema=True, max_grad_norm=1.0,
                                                         gradient_accumulation_steps=2)),
                           ("LoRA", dict(use_lora=True, lora_rank=4, use_ema=True))):
        figures["tiny"][name] = run = tiny_run(cache, args.steps, args.warmup, settings)
        print(f"tiny, {name}: {run['reads_per_step']:.2f} host reads per optimizer step, "
              f"{run['steps_per_s']:.2f} steps/s (steps {args.warmup + 1}-{args.steps}), "
              f"pictures while training: {run['pictures_held_while_training']}")
    figures["picture_mib_per_100"] = picture_ram(cache, args.pictures, 512)
    print(f"pictures in RAM: {figures['picture_mib_per_100']:.0f} MiB per 100 at 512 px (before the latent cache)")
    if not args.skip_sd15:
        scan = figures["sd15_scan"] = {**sd15_scan(args.repeat), "repeat": args.repeat}
        print(f"SD 1.5 UNet ({scan['weights'] / 1e6:.0f} M weights) + AdamW state ({scan['state_tensors']} tensors), "
              f"fp32 on the CPU: pre-save scan {scan['old_s']:.1f} s before issue 29, {scan['fused_s']:.1f} s fused "
              f"(best of {args.repeat}; model built in {scan['build_s']:.0f} s)")
    if args.record:
        print(f"wrote {record(args.record, figures, args.date)}")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
