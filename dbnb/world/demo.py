"""`dbnb demo`: a real DreamBooth run end to end, with no download and no GPU needed.

It writes the pretrained tiny world model (dbnb.evaluate.scorers.world: characters drawn in flat colours,
64×64), five pictures of one character with the seed's kind of asymmetric design (yellow
left / black right outfit, a hair coil on one side only) and the rare token "hnzk", class
images generated from the base model with the class prompt, then trains with prior
preservation, saving checkpoints and previews like a real run, and scores every checkpoint
by pixel analysis: does "hnzk girl" draw *this* character, are its sides kept, does "girl"
still draw anyone (dbnb.evaluate.score, score_with=world).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

from PIL import Image

from dbnb.core.config import Config
from dbnb.evaluate.score import score_run
from dbnb.evaluate.scorers import world
from dbnb.prep.classimages import ensure_class_images
from dbnb.run.folder import RunFolder
from dbnb.ship.export import export
from dbnb.ship.report import model_card, write_report
from dbnb.train.loop import train
from dbnb.world.tiny import TINY_RESOLUTION, make_world_model

INSTANCE_PROMPT = "hnzk girl"
CLASS_PROMPT = "girl"
DEMO_STEPS = 400
# The training pictures are all full body, so "upper body" is something the base model draws
# on request and the trained token has never been shown: the demo's flexibility test, which
# holds early on and fails once the token is overfit to its pictures (the seed's trade-off).
INSTANCE_FRAMING = "full body"
FLEXIBILITY_PROMPT = "{instance_prompt}, upper body"
# `dbnb demo --lora`: the same world, pictures and class images, LoRA instead of the whole UNet.
# The text encoder's adapters are what teach the token the hair colour (UNet adapters alone
# learnt the outfit's sides but drew the hair right in 1 of 8 samples after 100 steps), and
# these tiny adapters move at rates far above SD's LoRA 1e-4. Measured (8 seeds, checkpoints every
# 5 steps): identity 0.25 at step 20, 0.62 at 30, 0.50 at 40, "upper body" followed 0.75-1.00
# until step 35 and 0.12 at 40: the token is stiff by step 40, and the recommendation is step 30.
LORA_DEMO_STEPS = 40
LORA_DEMO = dict(run_name="demo-lora", use_lora=True, lora_rank=8, lora_text_encoder_rank=8,
                 lora_learning_rate=1e-2, lora_text_encoder_learning_rate=5e-3,
                 train_text_encoder=False)  # its adapters, not the whole text encoder


def draw_character(index: int, size: int = TINY_RESOLUTION) -> Image.Image:
    """Picture `index` of the demo character (world.HERO), each in its own seeded pose."""
    return world.draw(world.pose(world.HERO, random.Random(index), framings=(INSTANCE_FRAMING,)), size)


def write_dataset(folder: Path, n_instance: int = 5, size: int = TINY_RESOLUTION) -> tuple[Path, Path]:
    """Instance pictures of the demo character, and the (empty) folder for its class images."""
    instance_dir, class_dir = folder / "instance", folder / "class"
    instance_dir.mkdir(parents=True, exist_ok=True)
    class_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_instance):
        path = instance_dir / f"{i:03d}.png"
        # Drawn once: a second demo (or one beside it) reads the pictures while this writes.
        if not path.exists():
            draw_character(i, size).save(path.with_suffix(".tmp"), format="PNG")
            path.with_suffix(".tmp").replace(path)
    return instance_dir, class_dir


def demo_config(out: Path, steps: int, lora: bool = False, **overrides) -> Config:
    """The demo's settings (the LoRA demo's with `lora`), then `overrides`."""
    settings = dict(
        pretrained_model_name_or_path=str(out / "model"),
        instance_data_dir=str(out / "data" / "instance"), class_data_dir=str(out / "data" / "class"),
        output_dir=str(out / "runs"), run_name="demo",
        instance_prompt=INSTANCE_PROMPT, class_prompt=CLASS_PROMPT,
        # Class images from the base model, as the seed generates them; this world has no
        # "bad quality" to steer away from, so no negative prompt.
        with_prior_preservation=True, num_class_images=50, class_images_mode="generate",
        class_negative_prompt="", class_guidance_scale=5.0, class_infer_steps=20,
        resolution=TINY_RESOLUTION, max_train_steps=steps,
        # Eight checkpoints: the token turns faithful, then stiff, within 50 steps, and the pick
        # between needs them (README, the tiny world); previews twice.
        save_every_steps=max(1, steps // 8), sample_every_steps=max(1, steps // 2),
        # A 64-pixel model with a few million weights moves at a far larger step than SD's 1e-6.
        learning_rate=2e-4, lr_scheduler="constant", lr_warmup_steps=0, train_batch_size=2,
        # The text encoder trained too is what makes the token stiff: the UNet alone stayed
        # flexible through 700 steps at 4e-4, its framing never falling for good.
        train_text_encoder=True, text_encoder_lr=2e-4,
        # Precision, 8-bit Adam and gradient checkpointing for the machine it runs on (on a CPU:
        # none of them; checkpointing there would only recompute the UNet for nothing).
        memory_profile="auto",
        sample_prompts=(INSTANCE_PROMPT, CLASS_PROMPT), sample_negative_prompt="", num_samples=2,
        sample_steps=20, sample_guidance_scale=5.0,
        # Scored by pixel analysis: the character's identity, its sides, a framing on request.
        score_with="world", test_fidelity_prompts=("{instance_prompt}",),
        test_flexibility_prompts=(FLEXIBILITY_PROMPT,),
        test_negative_prompt="", test_seeds=8, test_infer_steps=20, test_guidance_scale=5.0,
        # No wide test image: the world is drawn square and its pixel analysis reads only squares.
        test_wide=0.0, flexibility_tolerance=0.25)
    return Config(**{**settings, **(LORA_DEMO if lora else {}), **overrides})


def prepare_world(out: Path, config: Config) -> None:
    """The model, the instance pictures and the generated class images (each made once per folder)."""
    if not (out / "model" / "model_index.json").exists():
        make_world_model(out / "model")
    write_dataset(out / "data")
    ensure_class_images(config, fill=True)


def export_recommended(run_dir: Path, step: int) -> Path:
    """The recommended checkpoint as the webui's single file, read back through from_single_file,
    with its model card beside it (exports/README.md), as every export of a run has."""
    path = export(run_dir, step=step, overwrite=True).path
    model_card(run_dir, path)
    return path


def announce(config: Config) -> None:
    """What the demo is about to do and about how long, before its first progress bar."""
    what = "LoRA adapters on" if config.use_lora else "the whole of"
    print(f"[dbnb] demo: DreamBooth on the tiny world model in the package (64×64 drawn characters; nothing is "
          f"downloaded). It makes {config.num_class_images} class images of {config.class_prompt!r}, trains "
          f"{what} the model on 5 pictures of {config.instance_prompt!r} for {config.max_train_steps} steps "
          f"(a checkpoint every {config.save_every_steps}), scores every checkpoint and exports the one it "
          f"recommends. About 1-3 minutes on 2 CPU cores.", flush=True)


def next_steps(scores) -> list[str]:
    """What a newcomer does after the demo."""
    lines = ["", "next:"]
    if scores:
        lines.append(f"  - open {scores.html} in a browser: every checkpoint's test images, and the scores")
    return lines + ["  - your own character: the notebooks/ (Colab or Paperspace, README: The notebooks), or "
                    "`dbnb config > my.yaml` and `dbnb train my.yaml` with a real base model"]


def run_demo(out: str | Path = "dbnb-demo", steps: int = DEMO_STEPS, score: bool = True, lora: bool = False,
             **overrides) -> dict:
    out = Path(out)
    started = time.time()
    config = demo_config(out, steps, lora, **overrides)
    announce(config)
    prepare_world(out, config)
    resume = "latest" if RunFolder.for_config(config).checkpoints_dir.exists() else None
    if resume:
        print("[dbnb] demo run exists: resuming it (delete the folder for a fresh one).")
    result = train(config, resume=resume)
    scores = score_run(result.run_dir) if score else None
    exported = export_recommended(result.run_dir, scores.recommendation["step"]) if scores else None
    elapsed = time.time() - started
    print(f"\n[dbnb] demo done in {elapsed:.0f} s")
    if exported:
        what = f"LoRA, kohya layout: <lora:{exported.stem}:1>, " if config.use_lora else ""
        print(f"  for the webui:         {exported}  ({what}recommended {scores.recommendation['checkpoint']}, "
              "verified)")
        print("                         a toy: the tiny world's 64×64 model shows the workflow, it draws nothing "
              "else; your character needs a real base model")
    print(f"  model (tiny world):    {out / 'model'}")
    print(f"  training images:       {config.instance_data_dir}  (class: {config.class_data_dir})")
    print(f"  run folder:            {result.run_dir}")
    for path in result.checkpoints:
        print(f"  checkpoint:            {path}")
    samples = RunFolder(result.run_dir).preview_grids()
    for path in samples:
        print(f"  preview grid:          {path}")
    if scores:
        print(f"  test images:           {scores.html}")
    print(f"  report:                {write_report(result.run_dir)}")
    print("\n".join(next_steps(scores)))
    return {"run_dir": result.run_dir, "seconds": elapsed, "checkpoints": result.checkpoints, "samples": samples,
            "scores": scores, "export": exported}
