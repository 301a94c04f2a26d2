"""The `dbnb` command. Each subcommand parses its arguments and calls one library function."""
from __future__ import annotations

import argparse
import sys

from dbnb.config import ConfigError


def cmd_doctor(args) -> int:
    from dbnb.env import run_doctor

    report = run_doctor(args.output_dir)
    print(report.format())
    return 0 if report.ok else 1


def cmd_make_tiny_model(args) -> int:
    from dbnb.tiny import make_tiny_model

    out = make_tiny_model(args.out, single_file=args.single_file, seed=args.seed)
    print(f"tiny SD 1.x model (diffusers layout): {out}")
    if args.single_file:
        print(f"tiny SD 1.x model (original single file): {args.single_file}")
    return 0


def cmd_config(args) -> int:
    import yaml

    from dbnb.config import describe, load_config

    if args.list:
        for row in describe():
            print(f"{row['name']:32} {row['type']:6} {row['default']!r:24} [{row['section']}] "
                  f"{row['label']}: {row['help']}")
        return 0
    if args.file and "=" in args.file and not args.file.endswith((".yaml", ".yml", ".json")):
        args.overrides, args.file = [args.file, *args.overrides], None  # only overrides were given
    config = load_config(args.file, args.overrides, preset=args.preset)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_train(args) -> int:
    from dbnb.config import load_config
    from dbnb.train import train

    config = load_config(args.config, args.overrides, preset=args.preset)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    return 130 if result.cancelled else 0


def cmd_demo(args) -> int:
    from dbnb.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def cmd_export(args) -> int:
    from dbnb.export import export, upload_to_hub

    result = export(args.source, step=args.step, ema=args.ema, fmt=args.format, precision=args.precision,
                    vae=args.vae, to=args.to, overwrite=args.overwrite, name=args.name)
    print(f"{result.path}  {result.size / 2**30:.2f} GiB  verified")
    if args.hub:
        print(f"uploaded: {upload_to_hub(result.path, args.hub)}")
    return 0


def cmd_convert(args) -> int:
    from dbnb.export import convert

    print(f"diffusers folder: {convert(args.file, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbnb", description="DreamBooth for Stable Diffusion 1.x.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("doctor", help="check this machine: versions, GPU, xformers, bitsandbytes, disk, RAM")
    p.add_argument("--output-dir", default=".", help="where runs will be written (free disk is checked there)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("make-tiny-model", help="write the tiny random SD 1.x model used by tests and the demo")
    p.add_argument("out", help="diffusers folder to write")
    p.add_argument("--single-file", help="also write one original-layout .safetensors / .ckpt file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("train", help="DreamBooth-train a model (accelerate launch -m dbnb train ... for several GPUs)")
    p.add_argument("config", help="config .yaml / .json (dbnb config --preset person > my.yaml writes one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the file")
    p.add_argument("--preset", help="person (character) or object_style, applied under the file")
    p.add_argument("--resume", metavar="latest|PATH", help="continue the run from its newest (or this) checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to logs/train.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="a real DreamBooth run on the embedded tiny model: no download, CPU is enough")
    p.add_argument("--out", default="dbnb-demo", help="folder for the model, images and run (default: dbnb-demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="one .safetensors / .ckpt for AUTOMATIC1111's webui, verified")
    p.add_argument("source", help="a run folder (or any model dbnb can load: folder, file, repo id)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with use_ema)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"))
    p.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "bf16"),
                   help="fp16 (default, ~2 GB for SD 1.5), fp32 (~4 GB) or bf16")
    p.add_argument("--vae", default="", help="bake in another VAE (folder, repo id or file)")
    p.add_argument("--to", default="", help="local (RUN/exports, default), drive (Colab), storage (Paperspace) or a folder")
    p.add_argument("--hub", metavar="USER/REPO", help="also upload to this private Hugging Face repo")
    p.add_argument("--overwrite", action="store_true", help="replace a file of the same name (default: add -2, -3…)")
    p.add_argument("--name", default="", help="file name without suffix (default: {run}_{step})")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="a single SD 1.x .safetensors / .ckpt → a diffusers folder")
    p.add_argument("file")
    p.add_argument("out")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("config", help="print a config (defaults, a preset, a file, overrides) as YAML")
    p.add_argument("file", nargs="?", help="a config .yaml / .json to start from")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--preset", help="person (character) or object_style")
    p.add_argument("--list", action="store_true", help="list every setting with its help")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"dbnb: {e}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message already tells the user what to do: print it, no traceback."""
    from dbnb.checkpoints import RunFolderError
    from dbnb.data import DatasetError
    from dbnb.env import DiskFullError
    from dbnb.models import ModelLoadError

    errors = [ConfigError, DatasetError, DiskFullError, ModelLoadError, RunFolderError]
    if "dbnb.export" in sys.modules:
        errors.append(sys.modules["dbnb.export"].ExportError)
    if "dbnb.train" in sys.modules:
        errors.append(sys.modules["dbnb.train"].TrainingError)
    return tuple(errors)
