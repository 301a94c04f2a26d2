"""Disk per save on a full-size SD 1.5 run, and the disk plan's figure for the default run.

Builds SD 1.5's UNet from the shipped config with random weights (no download), writes one
checkpoint's parts with the trainer's own writers (`dbnb.run.checkpoints`: fp16 weights, fp32
master) and, for comparison, the fp32 folder every save wrote before; prints sizes and times.
Then the disk plan (`dbnb.train.diskplan`) for the default settings (3000 steps, a save every 500,
8-bit Adam, keep_last_n 1) from the real models' shapes, and what it offers on a free Google
Drive (15 GiB).

    python bench/bench_disk.py [--dir /tmp/dbnb-bench-disk] [--free-gib 15]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def sd15(device: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbnb.family.sd1.skeleton import skeleton_config

    torch.manual_seed(0)
    with torch.device(device):
        return SimpleNamespace(unet=UNet2DConditionModel.from_config(skeleton_config("unet")),
                               vae=AutoencoderKL.from_config(skeleton_config("vae")),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**skeleton_config("text_encoder"))))


def timed(what: str, write, path: Path) -> None:
    from dbnb.core.disk import format_bytes
    from dbnb.run.checkpoints import dir_size

    started = time.perf_counter()
    write()
    size = dir_size(path) if path.is_dir() else path.stat().st_size
    print(f"{what:<44} {format_bytes(size):>10}  {time.perf_counter() - started:6.1f} s", flush=True)


def time_one_save(folder: Path) -> None:
    """The full SD 1.5 UNet (fp32, ~3.4 GB) lives only while this runs."""
    from dbnb.family.sd1.family import SD1
    from dbnb.run.checkpoints import WEIGHTS_DTYPE, write_model, write_tensors

    unet = sd15("cpu").unet
    state = unet.state_dict()
    print(f"SD 1.5 UNet: {sum(p.numel() for p in unet.parameters()):,} values")
    timed("weights, fp16 (unet/, kept for every save)",
          lambda: write_model(folder / "unet", unet, state, WEIGHTS_DTYPE, SD1.parts.denoiser.file), folder / "unet")
    timed("master, fp32 (state/unet.safetensors)", lambda: write_tensors(folder / "master.safetensors", state,
                                                                         torch.float32), folder / "master.safetensors")
    timed("before: fp32 weights kept for every save", lambda: unet.save_pretrained(folder / "unet-fp32"),
          folder / "unet-fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder)")
    parser.add_argument("--free-gib", type=float, default=15.0, help="free space to plan against (Drive: 15)")
    args = parser.parse_args()

    from dbnb.core.config import Config
    from dbnb.core.disk import format_bytes
    from dbnb.run.folder import RunFolder
    from dbnb.train import diskplan

    folder = Path(args.dir or tempfile.mkdtemp(prefix="dbnb-bench-disk-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; writing under {folder}")

    # 1. One save of a full run, as the trainer writes it, beside the fp32 folder of before.
    time_one_save(folder)
    shutil.rmtree(folder)

    # 2. The default run's plan, from the real shapes (meta tensors: no memory).
    config = Config(output_dir=str(folder))
    pipe = sd15("meta")
    pipe.text_encoder.requires_grad_(False)
    plan = diskplan.plan(config, pipe.unet, pipe.text_encoder, pipe.vae, "AdamW8bit", 0, config.max_train_steps,
                         RunFolder(folder))
    print(f"default run (SD 1.5, {config.max_train_steps} steps, save every {config.save_every_steps}, "
          f"8-bit Adam, keep_last_n {config.keep_last_n}): {plan.line()}")
    print(f"  during the last save {format_bytes(plan.during_last_save)}, at the end {format_bytes(plan.at_the_end)}")
    free = int(args.free_gib * (1 << 30))
    verdict = "fits" if plan.need <= free else diskplan.fitting(plan, free)
    print(f"  on {args.free_gib:g} GiB free: {verdict}")


if __name__ == "__main__":
    main()
