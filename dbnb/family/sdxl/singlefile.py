"""An SDXL diffusers folder seen as its single file's (original-layout) keys, whose tensors are read
only when asked for, as dbnb.family.sd1.singlefile sees an SD 1.x folder: merges read their inputs
through this a tensor at a time, so a folder merges as the file an export would write of it.

The keys and tensors are the export's (dbnb.family.sdxl.layout.original_state_dict): the same maps,
bigG's q / k / v concatenated as each in_proj is read, the two constants and the base's markers.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch

from dbnb.family.sd1 import layout as sd1
from dbnb.family.sd1 import singlefile as sd1_files
from dbnb.family.sd1.singlefile import Entry, SDFileError, component_entries, mapped
from dbnb.family.sdxl import layout
from dbnb.family.sdxl.load import FINGERPRINT_PARTS, sampling_of

def _constant(tensor: torch.Tensor) -> Entry:
    return (lambda: tensor, tuple(tensor.shape))


def _bigg_entry(target: str, sources: list[Entry]) -> Entry:
    shape = layout.bigg_tensor(target, [torch.empty(shape, device="meta") for _, shape in sources]).shape
    return (lambda: layout.bigg_tensor(target, [read() for read, _ in sources]), tuple(shape))


def folder_entries(folder: Path, stack: ExitStack) -> dict[str, Entry]:
    """An SDXL diffusers folder in the original layout, still unread (with its scheduler's markers)."""
    raw = {part: component_entries(folder, part, stack) for part in FINGERPRINT_PARTS}
    try:
        out = mapped(raw["unet"], layout.unet_key_map(raw["unet"])) | mapped(raw["vae"], sd1.vae_key_map(raw["vae"]))
        out |= mapped(raw["text_encoder"], layout.clip_l_key_map(raw["text_encoder"]))
        bigg = layout.bigg_sources(raw["text_encoder_2"])
    except ValueError as e:
        raise SDFileError(f"{folder}: not an SDXL folder dbnb reads ({e}).") from None
    positions = next(shape for key, (_, shape) in raw["text_encoder"].items() if key.endswith("position_embedding.weight"))
    out[layout.POSITION_IDS] = _constant(torch.arange(positions[0])[None])
    out |= {dst: _bigg_entry(dst, [raw["text_encoder_2"][s] for s in sources]) for dst, sources in bigg.items()}
    out[layout.LOGIT_SCALE] = _constant(torch.tensor(layout.LOGIT_SCALE_VALUE))
    return out | {key: _constant(marker) for key, marker in layout.markers(*sampling_of(str(folder))).items()}


def weight_files(path: Path) -> list[Path]:
    """The file itself, or a folder's UNet, VAE and both text encoders' weight files in that order."""
    return sd1_files.weight_files(path, FINGERPRINT_PARTS)
