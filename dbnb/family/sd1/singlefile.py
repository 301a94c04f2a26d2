"""SD 1.x model files as they are stored, read lazily: a single file (.safetensors / .ckpt) or a
diffusers folder, seen as original-layout keys whose tensors are read only when asked for.

Merging reads its inputs through this a tensor at a time; the loader and the export's
read-back ask it for a file's keys and shapes (the header only, for .safetensors); hashes ask
it which files a folder's weights are. A damaged or non-weight file is named through
`dbnb.core.weights` before any work.
"""
from __future__ import annotations

import zipfile
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from dbnb.core import weights
from dbnb.core.errors import DbnbError
from dbnb.family.sd1.layout import text_encoder_key_map, unet_key_map, vae_key_map, vae_tensor

COMPONENTS = ("unet", "vae", "text_encoder")
# Weight files of a diffusers folder, in order of preference (plain, sharded, fp16 variant, pickle).
FOLDER_FILES = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*-of-*.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "model-*-of-*.safetensors", "model.fp16.safetensors",
                     "pytorch_model.bin"),
}
FOLDER_FILES["vae"] = FOLDER_FILES["unet"]
FOLDER_FILES["text_encoder_2"] = FOLDER_FILES["text_encoder"]  # SDXL's second, a transformers model too
_FOLDER_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}

Entry = tuple[Callable[[], torch.Tensor], tuple[int, ...]]  # (read the tensor, its shape)
REOPEN_BYTES = 1 << 27  # per file: 4 merge inputs keep at most ~0.5 GiB of input pages resident


class SDFileError(DbnbError, ValueError):
    """A model folder is incomplete or not SD 1.x; the message names the folder and component."""


class LazyFile:
    """One weight file, read a tensor at a time. Both loaders map the file, and every page a
    tensor touched stays in the process's RSS while the mapping is open (16 GiB for four SD 1.5
    inputs), so the file is reopened after each REOPEN_BYTES read. A tensor already returned
    keeps its own pages valid until it is dropped."""

    def __init__(self, path: Path):
        weights.check(path)  # a damaged or non-weight file is named here, before any work
        self.path, self.since, self._handle = path, 0, None
        self.safetensors = path.suffix.lower() == ".safetensors"
        # A legacy (non-zip) .ckpt cannot be mapped, only read whole: reopening would re-read it.
        self.reopen = self.safetensors or zipfile.is_zipfile(path)
        opened = self._open()
        if self.safetensors:
            self.metadata = dict(opened.metadata() or {})
            self.shapes = {k: tuple(opened.get_slice(k).get_shape()) for k in opened.keys()}
        else:
            self.metadata, self.shapes = {}, {k: tuple(t.shape) for k, t in opened.items()}

    def _open(self):
        if self.safetensors:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), "pt")
            self._get = self._handle.get_tensor
            return self._handle
        state = weights.read_state_dict(self.path)  # refuses pickles that would run code
        self._get = state.__getitem__
        return state

    def get(self, key: str) -> torch.Tensor:
        if self._get is None:
            self._open()
        tensor = self._get(key)
        self.since += tensor.numel() * tensor.element_size()
        if self.reopen and self.since >= REOPEN_BYTES:
            self.close()
        return tensor

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = self._get = None
        self.since = 0


def file_entries(path: Path, stack: ExitStack) -> tuple[dict[str, Entry], dict[str, str]]:
    """Every tensor of one weight file, unread, and its metadata. safetensors go through
    `safe_open`, anything else through dbnb's safe loader (weights_only, mmap)."""
    reader = LazyFile(path)
    stack.callback(reader.close)
    return {k: (partial(reader.get, k), shape) for k, shape in reader.shapes.items()}, reader.metadata


def component_files(folder: Path, component: str) -> list[Path]:
    """The weight files of `folder`'s `component` subfolder (named as FOLDER_FILES says)."""
    patterns = FOLDER_FILES[component]
    for pattern in patterns:
        found = sorted((folder / component).glob(pattern))
        if found:
            return found
    raise SDFileError(f"{folder} has no {component} weights ({folder / component / patterns[0]}): "
                      "is the folder complete?")


def component_entries(folder: Path, component: str, stack: ExitStack) -> dict[str, Entry]:
    """One part of a diffusers folder by its own (diffusers) keys, still unread."""
    raw: dict[str, Entry] = {}
    for file in component_files(folder, component):
        raw |= file_entries(file, stack)[0]
    return raw


def mapped(raw: dict[str, Entry], key_map: dict[str, str]) -> dict[str, Entry]:
    """`raw`'s entries under their original-layout keys; the VAE's mid attention, Linear in
    diffusers, becomes the file's 1x1 conv as it is read (vae_tensor leaves every other key as it is)."""
    out: dict[str, Entry] = {}
    for src, dst in key_map.items():
        read, shape = raw[src]
        out[dst] = (partial(lambda r, key: vae_tensor(key, r()), read, dst),
                    tuple(vae_tensor(dst, torch.empty(shape, device="meta")).shape))
    return out


def folder_entries(folder: Path, stack: ExitStack) -> dict[str, Entry]:
    """A diffusers folder seen in the original layout, still unread."""
    out: dict[str, Entry] = {}
    for component in COMPONENTS:
        raw = component_entries(folder, component, stack)
        try:
            out |= mapped(raw, _FOLDER_MAPS[component](raw))
        except ValueError as e:
            raise SDFileError(f"{folder}: {component} is not an SD 1.x {component} ({e}).") from None
    return out


def weight_files(path: Path, components: tuple[str, ...] = COMPONENTS) -> list[Path]:
    """The file itself, or a diffusers folder's `components`' weight files in that order (SD 1.x's:
    UNet, VAE, text encoder)."""
    if path.is_dir():
        return [f for component in components for f in component_files(path, component)]
    return [path]


def keys_and_shapes(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """A single file's keys and tensor shapes; of a .safetensors from its header, no tensor read."""
    if path.suffix.lower() == ".safetensors":
        with weights.open_safetensors(path) as f:
            keys = list(f.keys())
            return keys, {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    state = weights.read_state_dict(path)  # refuses unsafe pickles; mmap keeps it cheap
    return list(state), {k: tuple(v.shape) for k, v in state.items()}
