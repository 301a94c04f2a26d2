"""Images per second of `dbnb prep` on this machine's CPU, without and with the segmenter.

Draws N synthetic pictures (a figure on a busy background, JPEG, various sizes around
1000x1400: typical downloaded art), then runs prepare_dataset twice into fresh folders:
remove_background off, and on. Nothing is downloaded: the segmenter is `--model` (pass the
real isnetis.onnx for the real figure) or, by default, a tiny stand-in with the same
contract, which times prep's own pre/post-processing (1024² letterbox, mask, composite) but
not ISNet's convolutions. The face detector is animeface when installed.

    python bench/bench_prep.py [--n 24] [--model /path/to/isnetis.onnx] [--resolution 512]
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def draw_pictures(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(n):
        w, h = rng.choice([(1000, 1400), (1200, 1200), (900, 1600), (1400, 1000)])
        im = Image.effect_noise((w // 4, h // 4), 60).convert("RGB").resize((w, h)).filter(ImageFilter.BLUR)
        d = ImageDraw.Draw(im)
        d.rectangle((w * 0.35, h * 0.2, w * 0.65, h * 0.95), fill=(rng.randrange(256), 40, 90))
        d.ellipse((w * 0.38, h * 0.05, w * 0.62, h * 0.25), fill=(250, 220, 200))
        im.save(folder / f"pic{i:03d}.jpg", quality=92)


def timed(src: Path, out: Path, **settings) -> float:
    from dbnb.prep import prepare_dataset

    t = time.perf_counter()
    report = prepare_dataset(src=src, out=out, progress=False, **settings)
    seconds = time.perf_counter() - t
    assert len(report.images) >= len(list(src.iterdir())), report.summary()
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="number of pictures")
    parser.add_argument("--model", default="", help="isnetis.onnx (default: the tiny stand-in)")
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    import os

    from dbnb.prep import Segmenter, animeface_detector, write_stand_in_model

    with tempfile.TemporaryDirectory(prefix="dbnb-bench-prep-") as tmp:
        root = Path(tmp)
        (root / "src").mkdir()
        draw_pictures(root / "src", args.n)
        model = Path(args.model) if args.model else write_stand_in_model(root / "stand-in.onnx")
        t = time.perf_counter()
        segmenter = Segmenter(model)
        load_s = time.perf_counter() - t
        detector = animeface_detector()
        common = dict(resolution=args.resolution, face_detector=detector, extra_framings=False)
        plain = timed(root / "src", root / "plain", remove_background=False, **common)
        seg = timed(root / "src", root / "seg", remove_background=True, segmenter=segmenter, **common)
        rerun = timed(root / "src", root / "seg", remove_background=True, segmenter=segmenter, **common)
    print(f"dbnb prep, {args.n} pictures ~1000x1400 JPEG -> {args.resolution}px, CPU ({os.cpu_count()} cores), "
          f"face detector: {'animeface' if detector else 'none'}")
    rows = [("without segmenter", plain, ""), (f"with segmenter ({model.name})", seg, f"; model load {load_s:.1f} s"),
            ("re-run, nothing to do", rerun, "")]
    for label, seconds, extra in rows:
        print(f"  {label:<36} {args.n / seconds:7.2f} images/s ({seconds:.2f} s{extra})")


if __name__ == "__main__":
    main()
