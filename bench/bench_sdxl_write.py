"""RAM and time of writing a full-size SDXL single file, and of `dbnb export` of that file.

Builds SDXL 1.0's parts from the shipped skeleton (random weights, in the file's precision, no
download), maps them to the original layout (dbnb.family.sdxl.layout) and writes them with the
export's writer; prints the process's RSS before the write, its peak during it, the file's size
and key count. The peak minus the model is what the write holds besides the model: bigG's q/k/v
concatenations and the writer's buffers, never a second copy of the model. Then exports that
file in a fresh process (load, write, verify: the read-back included) and prints its peak RSS.

    python bench/bench_sdxl_write.py [--dir /tmp] [--precision fp16]
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# One export in a fresh process that reports its own peak RSS.
EXPORT = """
import resource, sys
from dbnb.ship.export import export
result = export(sys.argv[1], precision=sys.argv[2], to=sys.argv[3], overwrite=True)
print("PEAK", result.path, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def full_size_parts(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dbnb.family.sdxl.skeleton import skeleton_config

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(skeleton_config("unet")),
                 "vae": AutoencoderKL.from_config(skeleton_config("vae")),
                 "te1": CLIPTextModel(CLIPTextConfig(**skeleton_config("text_encoder"))),
                 "te2": CLIPTextModelWithProjection(CLIPTextConfig(**skeleton_config("text_encoder_2")))}
    generator = torch.Generator().manual_seed(seed)
    for module in parts.values():
        module.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02, generator=generator)  # every page touched: resident, as a loaded model's
    return parts


def main():
    from dbnb.family.sd1.layout import write_single_file
    from dbnb.family.sdxl import layout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--precision", choices=DTYPES, default="fp16")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="dbnb-bench-sdxl-write-"))
    t = time.time()
    parts = full_size_parts(DTYPES[args.precision])
    model_gib = sum(p.numel() * p.element_size() for m in parts.values() for p in m.parameters()) / 2**30
    print(f"built full-size SDXL ({args.precision}, {model_gib:.2f} GiB of weights) in {time.time() - t:.0f} s; "
          f"RSS {rss_gib():.2f} GiB")
    encoder = torch.nn.ModuleDict({"te1": parts["te1"], "te2": parts["te2"]})
    before = rss_gib()
    t = time.time()
    state = layout.original_state_dict(parts["unet"].state_dict(), parts["vae"].state_dict(), encoder.state_dict(),
                                       layout.EPSILON)
    path = write_single_file(folder / "sdxl.safetensors", state)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {len(state)} tensors) in {time.time() - t:.0f} s")
    print(f"RSS before the write {before:.2f} GiB, peak {peak:.2f} GiB: the write added at most "
          f"{peak - before:.2f} GiB to a {model_gib:.2f} GiB model")
    del state, parts, encoder
    t = time.time()
    out = subprocess.run([sys.executable, "-c", EXPORT, str(path), args.precision, str(folder / "out")],
                         capture_output=True, text=True, check=True).stdout
    peak_line = next(line for line in out.splitlines() if line.startswith("PEAK"))
    exported, peak_kib = peak_line.split()[1:]
    print(f"dbnb export of it ({args.precision}, verified): peak RSS {int(peak_kib) / 2**20:.2f} GiB, "
          f"{time.time() - t:.0f} s")
    path.unlink()
    Path(exported).unlink()


if __name__ == "__main__":
    main()
