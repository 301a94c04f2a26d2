"""SD 1.x's single file, the checkpoint AUTOMATIC1111's webui loads, as its family offers it to
dbnb.ship.export (dbnb.family.base.SingleFile): the parts in the original layout
(dbnb.family.sd1.layout), the writer, and a written file read back as diffusers reads it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dbnb.core.versions import dtype_argument
from dbnb.core.weightfile import remove_leftovers
from dbnb.family.base import Models
from dbnb.family.sd1 import layout
from dbnb.family.sd1.load import save_folder, sd1_variant, skeleton_folder
from dbnb.family.sd1.singlefile import Entry, file_entries, folder_entries, keys_and_shapes, weight_files


class WebuiFile:
    suffixes = layout.WRITTEN_SUFFIXES
    parts = layout.FILE_PARTS

    def state_dict(self, unet: dict, vae: dict, text_encoder: dict, base: str = "") -> dict[str, torch.Tensor]:
        return layout.original_state_dict(unet, vae, text_encoder)  # SD 1.x files mark nothing of their base

    def keys(self, unet: dict, vae: dict, text_encoder: dict, base: str = "") -> set[str]:
        return {*layout.unet_key_map(unet).values(), *layout.vae_key_map(vae).values(),
                *layout.text_encoder_key_map(text_encoder).values()}

    def keys_and_shapes(self, path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        return keys_and_shapes(path)

    def entries(self, path: Path, stack) -> dict[str, Entry]:
        return file_entries(path, stack)[0]

    def folder_entries(self, folder: Path, stack) -> dict[str, Entry]:
        return folder_entries(folder, stack)

    def weight_files(self, path: Path) -> list[Path]:
        return weight_files(path)

    def architecture(self, keys, shapes: dict, source: str) -> str:
        variant = sd1_variant(keys, shapes)  # a ModelLoadError says what else the file is
        return "SD 1.x" if variant == "sd15" else variant

    def sampling(self, keys) -> str:
        return "epsilon"  # SD 1.x files mark nothing: every SD 1.x base predicts the noise

    def write(self, path: Path, state: dict, **options) -> Path:
        return layout.write_single_file(path, state, **options)

    def remove_leftovers(self, folder: Path) -> list[Path]:
        return remove_leftovers(folder)

    def read_back(self, path: Path, keys: list[str], shapes: dict, dtype: torch.dtype) -> Models:
        from diffusers import StableDiffusionPipeline  # lazy: loads diffusers

        from dbnb.family.sd1.family import SD1  # lazy: that module imports this one

        config = skeleton_folder(sd1_variant(keys, shapes), None)
        pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                        **dtype_argument("diffusers", dtype), safety_checker=None,
                                                        requires_safety_checker=False)
        return SD1.models_of(pipe)

    def to_folder(self, path: Path, folder: Path, records: dict[str, dict]) -> Path:
        return save_folder(path, folder, records)
