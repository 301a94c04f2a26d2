"""The configs an SDXL single file is loaded with, since it carries none: SDXL 1.0 base's own
(`assets/sdxl`: each part's config, the scheduler's, both tokenizers) and the widths of dbnb's
tiny SDXL (the same topology, read offline by its widths, as dbnb.family.sd1.skeleton does for
SD 1.x), and which of the two a file is.

The tiny SDXL built from these widths for tests, bench and the notebooks: dbnb.world.tiny_sdxl.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from dbnb.core.errors import DbnbError
from dbnb.core.platform import default_cache_dir
from dbnb.family.sd1.skeleton import TINY_VAE, config_folder

SKELETON = Path(__file__).resolve().parents[2] / "assets" / "sdxl"  # dbnb/assets: package data
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
TOKENIZERS = ("tokenizer", "tokenizer_2")

TINY_WIDTHS = (32, 16)  # CLIP-L's and bigG's hidden sizes, tiny (they differ, as loaders tell the two apart by width)
TINY_PROJECTION = 16    # text_encoder_2's pooled projection: the UNet's text_embeds
TINY_TIME_EMBED = 8     # per time id: the UNet's added embedding reads 6 of them and the pooled text
# Only the widths change; everything else comes from SDXL 1.0's own configs.
TINY = {
    "unet": dict(sample_size=8, block_out_channels=[32, 32, 64], layers_per_block=1, attention_head_dim=[2, 2, 4],
                 transformer_layers_per_block=1, norm_num_groups=8, cross_attention_dim=sum(TINY_WIDTHS),
                 addition_time_embed_dim=TINY_TIME_EMBED,
                 projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED + TINY_PROJECTION),
    "vae": TINY_VAE,
    "text_encoder": dict(hidden_size=TINY_WIDTHS[0], intermediate_size=2 * TINY_WIDTHS[0], num_attention_heads=4,
                         num_hidden_layers=3, projection_dim=TINY_PROJECTION, hidden_act="gelu"),
    "text_encoder_2": dict(hidden_size=TINY_WIDTHS[1], intermediate_size=2 * TINY_WIDTHS[1], num_attention_heads=4,
                           num_hidden_layers=3, projection_dim=TINY_PROJECTION),
}
VARIANTS = {"tiny": TINY}  # the small single-file variants dbnb reads offline, by their widths

# The original layout's keys whose shapes tell the variants apart: the UNet's first conv, bigG's width.
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
BIGG_WIDTH = "conditioner.embedders.1.model.ln_final.weight"


class SDXLFileError(DbnbError, ValueError):
    """An SDXL single file whose widths match no config dbnb ships; the message says what it is."""


def skeleton_config(part: str, **overrides) -> dict:
    """SDXL 1.0 base's config for one part (`unet`, `vae`, `text_encoder`, `text_encoder_2`, `scheduler`)."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    config = json.loads((SKELETON / part / name).read_text())
    config.update(copy.deepcopy(overrides))
    return config


def sdxl_variant(shapes: dict, source: str) -> str:
    """'sdxl' (SDXL 1.0's widths: every SDXL-family base) or 'tiny' for an original-layout SDXL file."""
    for variant, over in ({"sdxl": {}} | VARIANTS).items():
        unet = skeleton_config("unet", **over.get("unet", {}))
        bigg = skeleton_config("text_encoder_2", **over.get("text_encoder_2", {}))
        if shapes.get(CONV_IN, (None,))[0] == unet["block_out_channels"][0] \
                and shapes.get(BIGG_WIDTH, (None,))[0] == bigg["hidden_size"]:
            return variant
    raise SDXLFileError(f"{source}: an SDXL file with a UNet {shapes.get(CONV_IN)} and a second text encoder "
                        f"{shapes.get(BIGG_WIDTH)} wide is not SDXL 1.0's shape (320 / 1280), which every "
                        "SDXL-family base has: is it an SDXL refiner or another architecture? Use an SDXL base model.")


def skeleton_folder(variant: str, cache_dir: str | Path | None = None) -> Path:
    """The config-only diffusers folder that `from_single_file` reads instead of the Hub."""
    if variant == "sdxl":
        return SKELETON

    def fill(tmp: Path) -> None:
        shutil.copy(SKELETON / "model_index.json", tmp / "model_index.json")
        for name in TOKENIZERS:
            shutil.copytree(SKELETON / name, tmp / name)

    return config_folder(Path(cache_dir or default_cache_dir()) / f"skeleton-sdxl-{variant}",
                         {part: skeleton_config(part, **VARIANTS[variant].get(part, {})) for part in PARTS}, fill)
