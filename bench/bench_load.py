"""Peak RAM of loading a full-size SD 1.5 single file through dbnb.family.sd1.load.load_pipeline.

Free Colab has ~12 GB of system RAM and converting / loading a 4 GB .ckpt there is the top
complaint about other notebooks. This builds an SD 1.5-size model with random weights from
the shipped config (no download), writes it as one fp32 file in the original layout, and
loads it in a fresh process per format, printing each load's peak RSS.

    python bench/bench_load.py [--dir /tmp/dbnb-bench] [--formats safetensors ckpt]
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

LOAD = """
import json, resource, sys, time
t = time.time()
from dbnb.family.sd1.load import load_pipeline
pipe = load_pipeline(sys.argv[1])
seconds = round(time.time() - t, 1)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
# Weights may still be lazily mapped from the file; reading each one (as .to("cuda") does)
# makes them resident, which is the figure that matters for a 12 GB Colab.
params = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters()]
checksum = sum(float(p.double().sum()) for p in params)
print(json.dumps({"seconds": seconds, "params": sum(p.numel() for p in params), "peak_rss_gib": loaded,
                  "touched_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def write_full_size(folder: Path, formats: list[str]) -> dict[str, Path]:
    from dbnb.family.sd1.layout import original_state_dict, write_single_file
    from dbnb.family.sd1.skeleton import skeleton_config
    from dbnb.world.tiny import build_components

    unet, vae, text = build_components(skeleton_config("unet"), skeleton_config("vae"),
                                       skeleton_config("text_encoder"), seed=0)
    state = original_state_dict(unet.state_dict(), vae.state_dict(), text.state_dict())
    paths = {}
    for fmt in formats:
        paths[fmt] = write_single_file(folder / f"sd15-random.{fmt}", state)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the test files (about 4 GB each)")
    parser.add_argument("--formats", nargs="+", default=["safetensors", "ckpt"])
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="dbnb-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    t = time.time()
    # Written in a child process so this process's RSS does not count the build.
    if not all((folder / f"sd15-random.{fmt}").exists() for fmt in args.formats):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
                f"from bench_load import write_full_size; write_full_size(Path({str(folder)!r}), {args.formats!r})")
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"wrote full-size SD 1.5 (random, fp32) in {time.time() - t:.0f} s to {folder}")
    for fmt in args.formats:
        path = folder / f"sd15-random.{fmt}"
        done = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"load_pipeline({path.name}): {path.stat().st_size / 2**30:.2f} GiB file, "
              f"{result['params'] / 1e6:.0f} M parameters, {result['seconds']} s, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB after loading, "
              f"{result['touched_rss_gib']:.2f} GiB after reading every weight")
    print(f"(this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")


if __name__ == "__main__":
    main()
