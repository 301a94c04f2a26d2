"""Test-prompt grid speed (`dbnb sample RUN_DIR`): pipeline load, per-checkpoint weight swap,
seconds per image, peak (V)RAM, through dbnb.evaluate.sample.sample_run.

    python bench/bench_sample.py                                   # tiny model, 64 px (CPU: seconds)
    python bench/bench_sample.py --model sd15 --checkpoints 2      # full-size SD 1.5 architecture (a GPU)

It writes a run folder by hand (config.json + checkpoints whose UNet is the base one scaled a
little, so every swap really changes weights) instead of training, then samples it twice:
once making every image, once more to show that unchanged images are reused. `--model sd15`
builds SD 1.5's architecture with random weights from the shipped config (no download).
Any Config setting can follow as key=value (e.g. test_seeds=4 test_infer_steps=28).
"""
from __future__ import annotations

import argparse
import resource
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


def make_run(model: Path, folder: Path, checkpoints: int, resolution: int) -> Path:
    """A run folder as training leaves it: config.json and checkpoints/step-NNNNNN/unet/."""
    from diffusers import UNet2DConditionModel

    from dbnb.core.config import Config
    from dbnb.family.sd1.family import SD1
    from dbnb.run.folder import RunFolder
    from dbnb.world.demo import write_dataset

    instance, _ = write_dataset(folder / "data", n_instance=3, size=resolution)
    config = Config(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance),
                    instance_prompt="hnzk girl", class_prompt="girl", output_dir=str(folder), run_name="run",
                    resolution=resolution, mixed_precision="fp16" if torch.cuda.is_available() else "no")
    run = RunFolder.for_config(config)
    run.create()
    config.save(run.config_path)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    for k in range(1, checkpoints + 1):
        if not run.checkpoint_dir(500 * k).exists():
            unet.load_state_dict({name: v * (1 + 1e-3 * k) for name, v in base.items()})
            run.write_checkpoint(500 * k, lambda f: unet.save_pretrained(f / SD1.parts.denoiser.name))
    return run.root


def report(label: str, result, total: float) -> None:
    n = result.rendered
    sec = result.seconds
    line = f"{label}: {n} images made, {result.reused} reused, {total:.1f} s in all"
    if n:
        swaps = max(1, len(result.rows) - 1)
        line += (f"; pipeline load {sec['load']:.1f} s, weight swap {sec['swap'] / swaps:.2f} s per checkpoint, "
                 f"{sec['render'] / n:.3f} s per image ({n / sec['render']:.2f} images/s)")
    print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--checkpoints", type=int, default=None, help="checkpoints in the run (default 3; sd15: 2)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is far faster for the tiny model on a busy box)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "dbnb-bench-sample"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    from dbnb.evaluate.sample import sample_run

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    resolution = args.resolution or (64 if args.model == "tiny" else 512)
    checkpoints = args.checkpoints or (3 if args.model == "tiny" else 2)
    t = time.time()
    run = make_run(model_folder(args.model, cache), cache / f"run-{args.model}-{resolution}-{checkpoints}",
                   checkpoints, resolution)
    print(f"model {args.model}, {resolution} px, {checkpoints} checkpoints + base; setup {time.time() - t:.0f} s; "
          f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"torch threads {torch.get_num_threads()}")
    for label, force in (("first call", True), ("second call", False)):
        t = time.time()
        result = sample_run(run, args.overrides, force=force, progress=False)
        report(label, result, time.time() - t)
    print(f"grid: {len(result.rows)} rows x {len(result.seeds)} seeds, {len(result.prompts)} prompts "
          f"-> {result.grids[0].parent}")
    if torch.cuda.is_available():
        print(f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
