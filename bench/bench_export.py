"""Peak RAM and time of `dbnb export` on a full-size SD 1.5 run, and the exported key counts.

Builds a run folder the way the trainer leaves it — config.json naming a full-size base
model file, one checkpoint with a full-size UNet — with random weights from the shipped
config (no download), then runs `dbnb export` in a fresh process per precision and prints
its peak RSS, time, file size and the original-layout key counts (a real SD 1.5 file has
686 UNet, 248 VAE and 196 text-encoder tensors).

    python bench/bench_export.py [--dir /tmp/dbnb-bench-export] [--precisions fp16 fp32]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One export in a fresh process that reports its own peak RSS.
EXPORT = """
import resource, sys
from dbnb.ship.export import export
result = export(sys.argv[1], precision=sys.argv[2], overwrite=True)
print("PEAK", result.path, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_run(folder: Path) -> Path:
    from dbnb.core.config import Config
    from dbnb.family.sd1.layout import original_state_dict, write_single_file
    from dbnb.family.sd1.skeleton import skeleton_config
    from dbnb.world.tiny import build_components

    unet, vae, text = build_components(skeleton_config("unet"), skeleton_config("vae"),
                                       skeleton_config("text_encoder"), seed=0)
    base = write_single_file(folder / "base.safetensors",
                             original_state_dict(unet.state_dict(), vae.state_dict(), text.state_dict()))
    run = folder / "runs" / "bench"
    unet.save_pretrained(run / "checkpoints" / "step-001000" / "unet")
    Config(pretrained_model_name_or_path=str(base), instance_prompt="hnzk girl", output_dir=str(folder / "runs"),
           run_name="bench").save(run / "config.json")
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None)
    parser.add_argument("--precisions", nargs="+", default=["fp16", "fp32"])
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="dbnb-bench-export-"))
    run = folder / "runs" / "bench"
    if not (run / "config.json").exists():
        t = time.time()
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
                f"from bench_export import make_run; make_run(Path({str(folder)!r}))")
        subprocess.run([sys.executable, "-c", code], check=True)
        print(f"built a full-size SD 1.5 run folder (random weights) in {time.time() - t:.0f} s: {run}")
    for precision in args.precisions:
        t = time.time()
        done = subprocess.run([sys.executable, "-c", EXPORT, str(run), precision], capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr[-3000:])
        path, peak = done.stdout.split("\n")[-2].split("PEAK ")[1].rsplit(" ", 1)
        print(f"export {precision}: {time.time() - t:.0f} s (verify included), "
              f"{Path(path).stat().st_size / 2**30:.2f} GiB, peak RSS {int(peak) / 2**20:.2f} GiB — {counts(Path(path))}")


def counts(path: Path) -> str:
    from safetensors import safe_open

    from dbnb.family.sd1.layout import ORIGINAL_PREFIXES

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    return ", ".join(f"{part} {sum(k.startswith(p) for k in keys)}" for part, p in ORIGINAL_PREFIXES.items())


if __name__ == "__main__":
    main()
