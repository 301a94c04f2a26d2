"""Peak RAM and time of a two-way weighted-sum merge of full-size SDXL models (dbnb.ship.merge).

Free Colab has ~12.7 GB of system RAM and an SDXL single file is 6.9 GB in fp16. This writes two
distinct SDXL 1.0-size models with random weights (fp16 single files in the original layout,
bench_sdxl_write.full_size_parts, no download), then merges them in a fresh process and prints its
peak RSS (ru_maxrss: mapped input pages included). The merge keeps only its result, in the output
dtype, so the peak is about the result's size (fp16: 6.9 GB) plus the inputs' pages it reopens past.

    python bench/bench_merge_sdxl.py [--dir /tmp/dbnb-bench-merge-sdxl] [--dtype fp16] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_sdxl_write import full_size_parts

MERGE = """
import json, resource, sys, time
from dbnb.ship.merge import merge
files, out, dtype = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
t = time.time()
result = merge(files, [0.7, 0.3], dtype=dtype, out_file=out, overwrite=True, progress=False)
print(json.dumps({"seconds": round(time.time() - t, 1), "recipe": result.recipe,
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def write_input(path: Path, seed: int) -> Path:
    from dbnb.family.sd1.layout import write_single_file
    from dbnb.family.sdxl import layout

    parts = full_size_parts(torch.float16, seed)
    encoder = torch.nn.ModuleDict({"te1": parts["te1"], "te2": parts["te2"]})
    return write_single_file(path, layout.original_state_dict(parts["unet"].state_dict(), parts["vae"].state_dict(),
                                                              encoder.state_dict(), layout.EPSILON))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/dbnb-bench-merge-sdxl")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    parser.add_argument("--keep", action="store_true", help="keep the input files for another run")
    parser.add_argument("--write", nargs=2, metavar=("FILE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:  # one input, in its own process: the model it builds is gone when it exits
        write_input(Path(args.write[0]), int(args.write[1]))
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"sdxl{seed}.safetensors" for seed in range(2)]
    for seed, file in enumerate(files):
        if not file.exists():
            t = time.time()
            subprocess.run([sys.executable, __file__, "--write", str(file), str(seed)], check=True)
            print(f"wrote {file} ({file.stat().st_size / 2**30:.2f} GiB) in {time.time() - t:.0f} s", flush=True)
    out = subprocess.run([sys.executable, "-c", MERGE, json.dumps([str(f) for f in files]),
                          str(folder / "merged.safetensors"), args.dtype], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    size = (folder / "merged.safetensors").stat().st_size / 2**30
    print(f"merge {result['recipe']} -> {args.dtype} ({size:.2f} GiB): {result['seconds']} s, "
          f"peak RSS {result['peak_rss_gib']} GiB")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
