"""`dbnb demo`: a real DreamBooth run end to end, with no download and no GPU needed.

It writes the tiny model, a small instance set of a made-up character with the seed's kind
of asymmetric design (yellow left / black right outfit, a hair coil on one side only),
fully transparent class images as the seed's community uses them, then trains with prior
preservation, saving checkpoints and previews like a real run.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from dbnb.config import Config
from dbnb.tiny import TINY_RESOLUTION, make_tiny_model

INSTANCE_PROMPT = "hnzk girl"
CLASS_PROMPT = "girl"


def draw_character(index: int, size: int = TINY_RESOLUTION) -> Image.Image:
    """One pose of the demo character on white; `index` shifts and scales it deterministically."""
    big = size * 4  # draw large, then downsample: smooth edges at 64 px
    image = Image.new("RGB", (big, big), "white")
    d = ImageDraw.Draw(image)
    scale = (1.0, 0.8, 1.2, 0.9, 1.1)[index % 5]
    cx = big // 2 + (-12, 8, 0, 14, -6)[index % 5]
    top = big // 8 + (0, 20, -10, 10, 5)[index % 5]
    head = int(big * 0.16 * scale)
    # hair and face
    d.ellipse([cx - head, top, cx + head, top + 2 * head], fill=(235, 120, 180))
    d.ellipse([cx - head * 3 // 4, top + head // 2, cx + head * 3 // 4, top + 2 * head], fill=(255, 224, 200))
    d.ellipse([cx - head // 3 - 4, top + head, cx - head // 3 + 4, top + head + 8], fill=(40, 160, 90))
    d.ellipse([cx + head // 3 - 4, top + head, cx + head // 3 + 4, top + head + 8], fill=(40, 160, 90))
    # the coil: on the character's right side of the head only (the image's left)
    for r in range(head // 2, 4, -6):
        d.arc([cx - head - r - 6, top + head - r, cx - head + r - 6, top + head + r], 0, 300,
              fill=(250, 200, 40), width=5)
    # the asymmetric outfit: yellow on the image's left half, black on the right
    body_top, body_bottom = top + 2 * head, min(big - 4, top + int(5.2 * head))
    d.polygon([(cx, body_top), (cx - head, body_top + 10), (cx - int(head * 1.3), body_bottom), (cx, body_bottom)],
              fill=(250, 210, 30))
    d.polygon([(cx, body_top), (cx + head, body_top + 10), (cx + int(head * 1.3), body_bottom), (cx, body_bottom)],
              fill=(25, 25, 25))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_dataset(folder: Path, n_instance: int = 5, class_per_instance: int = 10,
                  size: int = TINY_RESOLUTION) -> tuple[Path, Path]:
    instance_dir, class_dir = folder / "instance", folder / "class"
    instance_dir.mkdir(parents=True, exist_ok=True)
    class_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_instance):
        draw_character(i, size).save(instance_dir / f"{i:03d}.png")
    transparent = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    for i in range(n_instance * class_per_instance):
        transparent.save(class_dir / f"{i:04d}.png")
    return instance_dir, class_dir


def demo_config(out: Path, steps: int) -> Config:
    on_gpu = torch.cuda.is_available()
    return Config(
        pretrained_model_name_or_path=str(out / "model"),
        instance_data_dir=str(out / "data" / "instance"), class_data_dir=str(out / "data" / "class"),
        output_dir=str(out / "runs"), run_name="demo",
        instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
        with_prior_preservation=True, num_class_images=50, class_images_mode="transparent",
        resolution=TINY_RESOLUTION, max_train_steps=steps,
        save_every_steps=max(1, steps // 2), sample_every_steps=max(1, steps // 2),
        # A random tiny model needs a far larger step than the seed's 1e-6 to move in seconds.
        learning_rate=1e-4, lr_warmup_steps=5, train_batch_size=2,
        mixed_precision="fp16" if on_gpu else "no", use_8bit_adam=on_gpu,
        sample_prompts=(INSTANCE_PROMPT, f"{INSTANCE_PROMPT}, smile"), num_samples=2, sample_steps=10,
    )


def run_demo(out: str | Path = "dbnb-demo", steps: int = 60) -> dict:
    from dbnb.train import train

    out = Path(out)
    started = time.time()
    if not (out / "model" / "model_index.json").exists():
        make_tiny_model(out / "model")
    write_dataset(out / "data")
    config = demo_config(out, steps)
    resume = "latest" if (Path(config.output_dir) / config.run_name / "checkpoints").exists() else None
    if resume:
        print("[dbnb] demo run exists: resuming it (delete the folder for a fresh one).")
    result = train(config, resume=resume)
    elapsed = time.time() - started
    print(f"\n[dbnb] demo done in {elapsed:.0f} s")
    print(f"  model (tiny, random):  {out / 'model'}")
    print(f"  training images:       {config.instance_data_dir}  (class: {config.class_data_dir})")
    print(f"  run folder:            {result.run_dir}")
    for path in result.checkpoints:
        print(f"  checkpoint:            {path}")
    samples = sorted((result.run_dir / "samples").glob("step-*/grid.png"))
    for path in samples:
        print(f"  preview grid:          {path}")
    return {"run_dir": result.run_dir, "seconds": elapsed, "checkpoints": result.checkpoints, "samples": samples}
