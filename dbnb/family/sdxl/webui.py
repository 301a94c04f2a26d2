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

from dbnb.family.base import Models
from dbnb.family.sd1.load import save_folder
from dbnb.family.sd1.webui import WebuiFile
from dbnb.family.sdxl import layout, singlefile
from dbnb.family.sdxl.load import from_single_file, load_pipeline, sampling_of
from dbnb.family.sdxl.skeleton import sdxl_variant


class SDXLFile(WebuiFile):
    """SD 1.x's file, written, listed and read as it is; its keys, parts, read-back and conversion SDXL's."""

    parts = layout.FILE_PARTS

    def state_dict(self, unet: dict, vae: dict, encoder: dict, base: str = "") -> dict[str, torch.Tensor]:
        return layout.original_state_dict(unet, vae, encoder, sampling_of(base))

    def keys(self, unet: dict, vae: dict, encoder: dict, base: str = "") -> set[str]:
        return layout.original_keys(unet, vae, encoder, sampling_of(base))

    def folder_entries(self, folder: Path, stack) -> dict:
        return singlefile.folder_entries(folder, stack)

    def weight_files(self, path: Path) -> list[Path]:
        return singlefile.weight_files(path)

    def architecture(self, keys, shapes: dict, source: str) -> str:
        variant = sdxl_variant(shapes, source)  # an SDXLFileError says what else the file is
        return "SDXL" if variant == "sdxl" else variant

    def sampling(self, keys) -> str:
        return layout.sampling_name(keys)

    def read_back(self, path: Path, keys: list[str], shapes: dict, dtype: torch.dtype) -> Models:
        from dbnb.family.sdxl.family import SDXL  # lazy: that module imports this one

        return SDXL.models_of(from_single_file(path, keys, shapes, dtype))

    def to_folder(self, path: Path, folder: Path, records: dict[str, dict]) -> Path:
        return save_folder(path, folder, records, load=load_pipeline)
