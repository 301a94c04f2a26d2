"""The configs the loader builds a model from when a single file carries none: SD 1.5's own
(`assets/sd15`: each component's config.json, the scheduler's, the CLIP tokenizer) and the
widths of dbnb's small variants (`tiny`, `world`: the same topology, read offline by their
widths), plus the tokenizer writer every saved diffusers folder uses and the writer of the
config-only folders `from_single_file` reads (SD 1.x's small variants, dbnb.family.sdxl.skeleton's).

The models built from these widths for tests, bench and the demo are in `dbnb.world.tiny`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

SKELETON = Path(__file__).resolve().parents[2] / "assets" / "sd15"  # dbnb/assets: package data

# Only the widths change; everything else comes from SD 1.5's own configs.
TINY_UNET = dict(block_out_channels=[32, 32, 64, 64], attention_head_dim=4,
                 cross_attention_dim=32, sample_size=8)
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], sample_size=64)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_hidden_layers=2, projection_dim=32)
# The pretrained world model (dbnb.evaluate.scorers.world, scripts/pretrain_world.py): same topology, a little
# wider where learning the world needs it.
WORLD_UNET = dict(block_out_channels=[32, 64, 64, 64], attention_head_dim=4, cross_attention_dim=32,
                  sample_size=8)
WORLD_VAE = dict(block_out_channels=[16, 16, 32, 32], norm_num_groups=16, sample_size=64)
WORLD_TEXT = dict(hidden_size=32, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3,
                  projection_dim=32)
# The small single-file variants dbnb reads offline, by their widths (unet, vae, text encoder).
VARIANTS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "world": (WORLD_UNET, WORLD_VAE, WORLD_TEXT)}


def skeleton_config(component: str, **overrides) -> dict:
    """SD 1.5's config for one component (`unet`, `vae`, `text_encoder`, `scheduler`)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    config = json.loads((SKELETON / component / name).read_text())
    config.update(copy.deepcopy(overrides))
    return config


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained, plus the vocab/merges files that older readers still look for."""
    import shutil

    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name in ("vocab.json", "merges.txt"):
        if not (out_dir / name).exists():
            shutil.copy(SKELETON / "tokenizer" / name, out_dir / name)


def config_folder(folder: Path, configs: dict[str, dict], fill: Callable[[Path], None]) -> Path:
    """A config-only diffusers folder at `folder` for `from_single_file`, written once: each part's
    config (the scheduler's as scheduler_config.json), then `fill(folder)` adds the rest (tokenizers,
    model_index.json). Written under a temporary name and renamed into place, so a second process
    never reads a half-written one."""
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent))
    for part, config in configs.items():
        (tmp / part).mkdir()
        name = "scheduler_config.json" if part == "scheduler" else "config.json"
        (tmp / part / name).write_text(json.dumps(config, indent=2))
    fill(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
