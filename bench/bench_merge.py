"""Peak RAM and time of a four-way weighted-sum merge of full-size SD 1.5 models (dbnb.ship.merge).

Free Colab has ~12 GB of system RAM, and the seed's base models are merges of four 4 GB
checkpoints ("NAI 5, any 2.7, gape 2, SD1.4 0.3"). This writes four distinct SD 1.5-size
models with random weights (fp32 single files in the original layout, ~4 GiB each, no
download), then merges them in a fresh process per output dtype and prints the merge's peak
RSS (ru_maxrss: every page the process ever had resident, mmap-backed pages included).

    python bench/bench_merge.py [--dir /tmp/dbnb-bench-merge] [--dtypes fp16 fp32] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

WEIGHTS, LABELS = [5, 2.7, 2, 0.3], ["NAI", "any", "gape", "SD1.4"]

MERGE = """
import json, resource, sys, time
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
from dbnb.ship.merge import merge
imported = rss()
files, out, dtype = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
t = time.time()
marks = []
log = lambda line: (marks.append((round(time.time() - t, 1), line)), print(line, file=sys.stderr))
result = merge(files, %r, labels=%r, dtype=dtype, out_file=out, overwrite=True, progress=False, log=log)
print(json.dumps({"seconds": round(time.time() - t, 1), "imported_rss_gib": imported, "peak_rss_gib": rss(),
                  "hashed_s": max(s for s, line in marks if line.startswith("input ")),
                  "recipe": result.recipe, "short_hash": result.short_hash,
                  "inputs": [i["short_hash"] for i in result.inputs]}))
""" % (WEIGHTS, LABELS)


def write_inputs(folder: Path, n: int) -> list[Path]:
    """n distinct full-size models: one seeded random SD 1.5, then seeded noise on top of it."""
    import torch

    from dbnb.family.sd1.layout import original_state_dict, write_single_file
    from dbnb.family.sd1.skeleton import skeleton_config
    from dbnb.world.tiny import build_components

    unet, vae, text = build_components(skeleton_config("unet"), skeleton_config("vae"),
                                       skeleton_config("text_encoder"), seed=0)
    state = original_state_dict(unet.state_dict(), vae.state_dict(), text.state_dict())
    paths = [write_single_file(folder / "sd15-random-0.safetensors", state)]
    for k in range(1, n):
        g = torch.Generator().manual_seed(k)
        noisy = {key: t + 0.02 * torch.randn(t.shape, generator=g) for key, t in state.items()}
        paths.append(write_single_file(folder / f"sd15-random-{k}.safetensors", noisy))
        del noisy
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/dbnb-bench-merge", help="where to write the inputs (~4 GiB each)")
    parser.add_argument("--n", type=int, default=4, help="how many models to merge (default 4)")
    parser.add_argument("--dtypes", nargs="+", default=["fp16"], choices=("fp16", "fp32", "bf16"))
    parser.add_argument("--ckpt", action="store_true", help="give the last model as a .ckpt (the safe loader's path)")
    parser.add_argument("--keep", action="store_true", help="keep the inputs for the next run")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"sd15-random-{k}.safetensors" for k in range(args.n)]
    if not all(f.exists() for f in files):
        t = time.time()
        # In a child process, so this process's RSS does not count the build.
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
                f"from bench_merge import write_inputs; write_inputs(Path({str(folder)!r}), {args.n})")
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"wrote {args.n} full-size SD 1.5 models (random, fp32) in {time.time() - t:.0f} s to {folder}")
    if args.ckpt:
        ckpt = files[-1].with_suffix(".ckpt")
        if not ckpt.exists():
            code = (f"from safetensors.torch import load_file; from dbnb.family.sd1.layout import write_single_file; "
                    f"write_single_file({str(ckpt)!r}, load_file({str(files[-1])!r}))")
            subprocess.run([sys.executable, "-c", code], check=True)
        files[-1] = ckpt
    size = sum(f.stat().st_size for f in files) / 2**30
    machine = f"{os.cpu_count()} CPU cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    try:
        for dtype in args.dtypes:
            out = folder / f"merged-{dtype}.safetensors"
            load = os.getloadavg()[0]
            done = subprocess.run([sys.executable, "-c", MERGE, json.dumps([str(f) for f in files]), str(out), dtype],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"merge failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{args.n}-way weighted sum \"{r['recipe']}\" of full-size SD 1.5 ({args.n} × "
                  f"{size / args.n:.2f} GiB fp32 {', '.join(sorted({f.suffix for f in files}))}) → {dtype} .safetensors "
                  f"({out.stat().st_size / 2**30:.2f} GiB) [{r['short_hash']}]: {r['seconds']} s "
                  f"(hashing the inputs: {r['hashed_s']} s), peak RSS {r['peak_rss_gib']:.2f} GiB "
                  f"({r['imported_rss_gib']:.2f} GiB after imports); {machine}, load average {load:.1f}")
            out.unlink()
            out.with_suffix(".json").unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
