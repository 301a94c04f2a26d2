"""SDXL's single file, the checkpoint the webui, Forge and ComfyUI load, as its family offers it to
dbnb.ship.export (dbnb.family.base.SingleFile): the parts in the original layout
(dbnb.family.sdxl.layout) with the base's v-prediction markers, SD 1.x's writer, and a written
file read back as diffusers reads it, offline from the shipped skeleton.

The writer is SD 1.x's (dbnb.family.sd1.layout.write_single_file): safetensors (0.8) writes each
tensor from its own memory and the .ckpt archive writes each storage's bytes as they are, so
neither holds a second copy of the model; the only new tensors are bigG's q/k/v concatenations.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dbnb.core.versions import dtype_argument
from dbnb.family.base import Models
from dbnb.family.sd1 import layout as sd1_layout
from dbnb.family.sd1.load import save_folder
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.sdxl import layout
from dbnb.family.sdxl.load import load_pipeline, sampling_of, scheduler_for
from dbnb.family.sdxl.skeleton import sdxl_variant, skeleton_folder


class SDXLFile:
    suffixes = sd1_layout.WRITTEN_SUFFIXES

    def state_dict(self, unet: dict, vae: dict, encoder: dict, base: str = "") -> dict[str, torch.Tensor]:
        return layout.original_state_dict(unet, vae, encoder, sampling_of(base) if base else ("epsilon", False))

    def keys(self, unet: dict, vae: dict, encoder: dict, base: str = "") -> set[str]:
        return layout.original_keys(unet, vae, encoder, sampling_of(base) if base else ("epsilon", False))

    def keys_and_shapes(self, path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        return keys_and_shapes(path)

    def write(self, path: Path, state: dict, **options) -> Path:
        return sd1_layout.write_single_file(path, state, **options)

    def remove_leftovers(self, folder: Path) -> list[Path]:
        return sd1_layout.remove_leftovers(folder)

    def read_back(self, path: Path, keys: list[str], shapes: dict, dtype: torch.dtype) -> Models:
        from diffusers import StableDiffusionXLPipeline  # lazy: loads diffusers

        from dbnb.family.sdxl.family import SDXL  # lazy: that module imports this one

        config = skeleton_folder(sdxl_variant(shapes, str(path)))
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, add_watermarker=False,
            scheduler=scheduler_for(config, layout.sampling(keys)), **dtype_argument("diffusers", dtype))
        return SDXL.models_of(pipe)

    def to_folder(self, path: Path, folder: Path, records: dict[str, dict]) -> Path:
        return save_folder(path, folder, records, load=load_pipeline)
