"""Pictures per second of the WD14 tagging step (`caption_mode=tags`) on this machine's CPU.

Draws N prepared-size pictures (512² PNG-like RGB art), then times `Tagger.detect` — dbnb's
pre-processing (white square, bicubic resize to the model's input size, BGR) plus the ONNX
run — in its batches. Nothing is downloaded: the tagger is `--model` (a folder with the real
`model.onnx` + `selected_tags.csv`, e.g. SmilingWolf/wd-swinv2-tagger-v3, for the real figure)
or, by default, a tiny stand-in with the v3 contract (448² NHWC input), which times dbnb's own
work but not the network's.

    python bench/bench_tagger.py [--n 64] [--model /path/to/wd-swinv2-tagger-v3]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw


def draw_pictures(n: int, size: int = 512, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), "white")
        d = ImageDraw.Draw(im)
        d.rectangle((size * 0.35, size * 0.2, size * 0.65, size * 0.95), fill=(rng.randrange(256), 40, 90))
        d.ellipse((size * 0.38, size * 0.05, size * 0.62, size * 0.25), fill=(250, 220, 200))
        out.append(im)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="number of pictures")
    parser.add_argument("--model", default="", help="tagger folder (default: the tiny stand-in)")
    args = parser.parse_args()
    import os

    from dbnb.prep.tagger import load_tagger, write_stand_in_tagger

    with tempfile.TemporaryDirectory(prefix="dbnb-bench-tagger-") as tmp:
        folder = args.model or str(write_stand_in_tagger(Path(tmp) / "stand-in"))
        t = time.perf_counter()
        tagger = load_tagger(folder)
        load = time.perf_counter() - t
        pictures = draw_pictures(args.n)
        tagger.detect(pictures[:2], 0.35, 0.85)  # warm-up: the first run allocates
        t = time.perf_counter()
        found = tagger.detect(pictures, 0.35, 0.85)
        seconds = time.perf_counter() - t
    print(f"tagger: {'stand-in (v3 contract, ' + str(tagger.size) + 'px)' if not args.model else args.model}; "
          f"providers {tagger.model.session.get_providers()}; {os.cpu_count()} CPU(s)")
    print(f"load {load:.2f} s; {args.n} pictures in {seconds:.2f} s = {args.n / seconds:.1f} pictures/s "
          f"({1000 * seconds / args.n:.1f} ms each); {sum(map(len, found)) / len(found):.1f} tags per picture")


if __name__ == "__main__":
    main()
