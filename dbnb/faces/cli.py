"""The `dbnb` command. Each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import sys

from dbnb.core.errors import DbnbError


def cmd_doctor(args) -> int:
    from dbnb.faces.doctor import run_doctor  # lazy: keeps `dbnb --help` fast

    report = run_doctor(args.output_dir)
    print(report.format())
    return 0 if report.ok else 1


def cmd_make_tiny_model(args) -> int:
    from dbnb.world.tiny import make_tiny_model  # lazy: torch, kept out of `dbnb --help`

    out = make_tiny_model(args.out, single_file=args.single_file, seed=args.seed)
    print(f"tiny SD 1.x model (diffusers layout): {out}")
    if args.single_file:
        print(f"tiny SD 1.x model (original single file): {args.single_file}")
    return 0


def cmd_config(args) -> int:
    import yaml  # lazy: yaml, kept out of `dbnb --help`

    from dbnb.core.config import class_word_warning, describe, load_config  # lazy: keeps `dbnb --help` fast

    if args.list:
        for row in describe():  # the Japanese help too: the seed's readers look for it (as in the form)
            print(f"{row['name']:32} {row['type']:6} {row['default']!r:24} [{row['section']}] "
                  f"{row['label']}: {row['help']}\n{'':32} {row['help_ja']}")
        return 0
    if args.file and "=" in args.file and not args.file.endswith((".yaml", ".yml", ".json")):
        args.overrides, args.file = [args.file, *args.overrides], None  # only overrides were given
    config = load_config(args.file, args.overrides, preset=args.preset)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), end="")
    if said := class_word_warning(config):  # on stderr: the YAML on stdout stays a config file
        print(f"warning: {said}", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    from dbnb.core.config import load_config  # lazy: keeps `dbnb --help` fast
    from dbnb.train.loop import train  # lazy: torch, kept out of `dbnb --help`

    config = load_config(args.config, args.overrides, preset=args.preset)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    return 130 if result.cancelled else 0


def cmd_plan(args) -> int:
    from dbnb.core.config import load_config  # lazy: keeps `dbnb --help` fast
    from dbnb.train.memory import settings_text, verdict  # lazy: torch, kept out of `dbnb --help`
    from dbnb.train.planner import CARDS, card, plan

    config = load_config(args.config, args.overrides, preset=args.preset)
    memory = {k: getattr(config, k) for k in ("mixed_precision", "use_8bit_adam", "gradient_checkpointing")}
    print(f"{config.pretrained_model_name_or_path}, {config.resolution} px, batch {config.train_batch_size}"
          + (" + class pictures" if config.with_prior_preservation else "") + f", {settings_text(memory)}, "
          f"optimizer={config.optimizer}, use_lora={str(config.use_lora).lower()}, "
          f"text encoder {'trained' if config.trains_text_encoder else 'frozen'}:")
    if config.memory_profile == "manual":
        print(plan(config).table())
    fits = [verdict(config, card(name)) for name in ([args.card] if args.card else CARDS)]
    for _, line in fits:
        print(line)
    return 0 if all(ok for ok, _ in fits) or not args.card else 1


def cmd_demo(args) -> int:
    from dbnb.world.demo import DEMO_STEPS, LORA_DEMO_STEPS, run_demo  # lazy: torch, kept out of `dbnb --help`

    run_demo(args.out, steps=args.steps or (LORA_DEMO_STEPS if args.lora else DEMO_STEPS), lora=args.lora)
    return 0


def cmd_export(args) -> int:
    from dbnb.run.folder import RunFolder  # lazy: torch (checkpoints), kept out of `dbnb --help`
    from dbnb.ship.export import export, upload_to_hub  # lazy: torch, kept out of `dbnb --help`

    result = export(args.source, step=args.step, ema=args.ema, fmt=args.format, precision=args.precision,
                    vae=args.vae, to=args.to, overwrite=args.overwrite, name=args.name, bake=args.bake)
    print(result.line())
    if RunFolder(args.source).config_path.is_file():  # a run folder: the model card beside the file
        from dbnb.ship.report import model_card  # lazy: torch, kept out of `dbnb --help`

        model_card(args.source, result.path)
    if args.hub:
        print(f"uploaded: {upload_to_hub(result.path, args.hub)}")
    return 0


def cmd_convert(args) -> int:
    from dbnb.ship.export import convert  # lazy: torch, kept out of `dbnb --help`

    print(f"diffusers folder: {convert(args.file, args.out)}")
    return 0


def cmd_prep(args) -> int:
    from dbnb.core.config import load_config  # lazy: keeps `dbnb --help` fast
    from dbnb.prep import prepare_dataset  # lazy: torch, kept out of `dbnb --help`

    config = load_config(args.config, args.overrides, preset=args.preset)
    report = prepare_dataset(config, src=args.src, out=args.out)
    print(report.summary())
    if "[filewords]" not in config.instance_prompt:
        print("note: the captions reach training only when instance_prompt contains [filewords].")
    return 0 if report.images else 1


def cmd_merge(args) -> int:
    from dbnb.ship.merge import merge  # lazy: torch, kept out of `dbnb --help`

    result = merge(args.models, args.weights, mode="add_difference" if args.add_difference else "weighted_sum",
                   alpha=args.alpha, normalize=not args.as_given, labels=args.labels, include_vae=not args.no_vae,
                   include_text_encoder=not args.no_text_encoder, unet_only=args.unet_only, dtype=args.precision,
                   out_file=args.out, out_dir=args.diffusers, name=args.name, overwrite=args.overwrite)
    print(f"{result.file or result.folder}  [{result.short_hash}]  {result.recipe}")
    return 0


def cmd_report(args) -> int:
    from dbnb.ship.report import write_report  # lazy: torch, kept out of `dbnb --help`

    path = write_report(args.run)
    print(path.read_text(encoding="utf-8"))
    print(f"written: {path}")
    return 0


def cmd_classimages(args) -> int:
    from dbnb.core.config import load_config  # lazy: keeps `dbnb --help` fast
    from dbnb.prep.classimages import make_class_images  # lazy: torch, kept out of `dbnb --help`

    status = make_class_images(load_config(args.config, args.overrides, preset=args.preset))
    print(status.message)
    return 0 if status.ok else 1


def cmd_sample(args) -> int:
    from dbnb.evaluate.sample import sample_run  # lazy: torch, kept out of `dbnb --help`

    result = sample_run(args.run, args.overrides, ema=args.ema, force=args.force, progress=not args.no_progress)
    for grid in result.grids:
        print(f"grid: {grid}")
    print(f"{result.rendered} images made, {result.reused} reused; all of them: {result.html}")
    return 0


def cmd_score(args) -> int:
    from dbnb.evaluate.score import score_run  # lazy: torch, kept out of `dbnb --help`

    result = score_run(args.run, args.overrides, ema=args.ema, progress=not args.no_progress)
    print(f"\ntable: {result.csv}\nplot: {result.plot}\npage: {result.html}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbnb", description="DreamBooth and LoRA for Stable Diffusion 1.x and SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check this machine: versions, GPU, xformers, bitsandbytes, disk, RAM")
    p.add_argument("--output-dir", default=".", help="where runs will be written (free disk is checked there)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("make-tiny-model", help="write the tiny random SD 1.x model used by tests and the demo")
    p.add_argument("out", help="diffusers folder to write")
    p.add_argument("--single-file", help="also write one original-layout .safetensors / .ckpt file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("prep", help="prepare pictures: check, cut out, square, crops, captions, report")
    p.add_argument("src", help="folder, .zip, Google Drive link, URL or .txt list of URLs (originals untouched)")
    p.add_argument("out", help="folder for the prepared set (your instance_data_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. remove_background=false resolution=512")
    p.add_argument("--config", help="a config .yaml / .json to start from")
    p.add_argument("--preset", help="person (the guide's character setup: dbnb.core.config.GUIDE_CHARACTER) or object_style")
    p.set_defaults(func=cmd_prep)

    p = sub.add_parser("classimages", help="class (regularization) images: generate, transparent or import; tops up")
    p.add_argument("config", help="config .yaml / .json (class_data_dir, class_prompt, num_class_images, ...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. class_images_mode=transparent")
    p.add_argument("--preset", help="person (the guide's character setup: nanU Unan, transparent class images, LR 1e-6 …) or object_style")
    p.set_defaults(func=cmd_classimages)

    p = sub.add_parser("train", help="DreamBooth-train a model (accelerate launch -m dbnb train ... for several GPUs)")
    p.add_argument("config", help="config .yaml / .json (dbnb config --preset person > my.yaml writes one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    p.add_argument("--preset", help="person (the guide's character setup) or object_style, applied under the file")
    p.add_argument("--resume", metavar="latest|PATH", help="continue the run from its newest (or this) checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to logs/train.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="predict the run's peak VRAM and system RAM, and whether it fits a card "
                                     "(no GPU, no weights needed)")
    p.add_argument("config", help="config .yaml / .json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    p.add_argument("--preset", help="person (the guide's character setup) or object_style, applied under the file")
    p.add_argument("--card", help="T4, L4, A10G, A100-40, A100-80, H100 or a size in GiB (default: all of "
                                  "them); the exit status is 1 when it does not fit")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="a real DreamBooth run on the embedded tiny pretrained world model, scored: "
                                     "no download, CPU is enough")
    p.add_argument("--out", default="dbnb-demo", help="folder for the model, images and run (default: dbnb-demo)")
    p.add_argument("--steps", type=int, help="training steps (default: dbnb.world.demo.DEMO_STEPS, 400; with --lora "
                                             "LORA_DEMO_STEPS, 40)")
    p.add_argument("--lora", action="store_true", help="train a LoRA (run demo-lora beside the full demo's) and "
                                                       "export it as the webui's kohya-layout LoRA file")
    p.set_defaults(func=cmd_demo)

    for name, helptext in (("sample", "test-prompt grids: base model + each checkpoint x prompts x seeds"),
                           ("score", "CLIP-I / DINO fidelity, CLIP-T flexibility per checkpoint, and a pick")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", help="the run folder")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="test settings, e.g. test_seeds=8")
        p.add_argument("--ema", action="store_true", help="use the EMA weights of each checkpoint")
        p.add_argument("--no-progress", action="store_true")
        if name == "sample":
            p.add_argument("--force", action="store_true", help="make every image again")
        p.set_defaults(func=cmd_sample if name == "sample" else cmd_score)

    p = sub.add_parser("export", help="one .safetensors / .ckpt for AUTOMATIC1111's webui and ComfyUI, verified")
    p.add_argument("source", help="a run folder (or any model dbnb can load: folder, file, repo id)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with use_ema)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"))
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "bf16"),
                   help="fp16 (default; a whole model: ~2 GB for SD 1.5, ~7 GB for SDXL), fp32 (twice that) or bf16")
    p.add_argument("--vae", default="", help="bake in another VAE (folder, repo id or file)")
    p.add_argument("--to", default="", help="local (RUN/exports, default), drive (Colab), storage (Paperspace) or a folder")
    p.add_argument("--hub", metavar="USER/REPO", help="also upload to this private Hugging Face repo")
    p.add_argument("--overwrite", action="store_true", help="replace a file of the same name (default: add -2, -3…)")
    p.add_argument("--name", default="", help="file name without suffix (default: {run}_{step})")
    p.add_argument("--bake", action="store_true",
                   help="LoRA runs: merge the LoRA into the base model and write a full model file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="a single SD 1.x or SDXL .safetensors / .ckpt → a diffusers folder")
    p.add_argument("file")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="merge base models of one family (SD 1.x or SDXL): weighted sum or add "
                       "difference (A + (B - C) x alpha)")
    p.add_argument("models", nargs="+", help="2+ models (files, folders, repo ids, URLs); add difference: A B C")
    p.add_argument("--weights", nargs="+", type=float, help="one per model, e.g. 5 2.7 2 0.3 (normalised to sum 1)")
    p.add_argument("--as-given", action="store_true", help="use the weights as given, not normalised")
    p.add_argument("--add-difference", action="store_true", help="A + (B - C) x alpha, exactly three models")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha of add difference (default 0.5)")
    p.add_argument("--labels", nargs="+", help="names for the recipe, e.g. NAI any gape SD1.4")
    p.add_argument("--unet-only", action="store_true", help="merge the UNet only; the rest from the first model")
    p.add_argument("--no-vae", action="store_true", help="take the VAE from the first model")
    p.add_argument("--no-text-encoder", action="store_true", help="take the text encoder(s) from the first model")
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "bf16"))
    p.add_argument("--out", help="single file to write (.safetensors / .ckpt)")
    p.add_argument("--diffusers", help="diffusers folder to write (ready to train from)")
    p.add_argument("--name", help="name of the result (default: the recipe)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("report", help="the run's training report (学習レポート) in the seed's format: RUN/report.md")
    p.add_argument("run", help="the run folder")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("config", help="print a config (defaults, a preset, a file, overrides) as YAML")
    p.add_argument("file", nargs="?", help="a config .yaml / .json to start from")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--preset", help="person (the guide's character setup: nanU Unan, transparent class images, LR 1e-6 …) or object_style")
    p.add_argument("--list", action="store_true", help="list every setting with its help (English, then Japanese)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func not in (cmd_doctor, cmd_config, cmd_report):  # these load no model: spare the import
        from dbnb.core.quiet import library_noise  # lazy: keeps `dbnb --help` fast
        library_noise(progress_bars=args.func is not cmd_plan)  # plan loads no weights, often not diffusers
    try:
        return args.func(args)
    except DbnbError as e:  # its message names what was wrong and the fix: no traceback
        print(f"dbnb: {e}", file=sys.stderr)
        return 2
