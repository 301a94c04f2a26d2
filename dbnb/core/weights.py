"""Reading weight files: `.safetensors`, and `.ckpt` / `.pt` / `.bin` pickles, safely.

Every reader of a weight file in dbnb (loading a base model, resume, convert, merge,
sample, export) comes through here, so a damaged file — a download cut short, a Drive
copy still syncing, a text page saved as `.ckpt` — is reported naming the file and what to
do, instead of a library error that names none. Pickles are only ever opened with
`torch.load(weights_only=True)`: a file that would run code is refused, not opened.
"""
from __future__ import annotations

import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from dbnb.core.errors import DbnbError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_MAGIC = b"\x80"     # the legacy format starts with a pickle protocol byte


class WeightFileError(DbnbError, RuntimeError):
    """A weight file cannot be read; the message names it and what to do."""


class UnsafeCheckpointError(WeightFileError):
    """A .ckpt needs arbitrary unpickling (it could run code), so it was not opened."""


def damaged(path: Path, reason: str) -> WeightFileError:
    return WeightFileError(f"{path} is damaged or incomplete ({reason}). It was probably cut short (a download, "
                           "a copy or a Drive sync that did not finish, or a full disk): copy or download it again, "
                           "or use another file.")


def not_weights(path: Path) -> WeightFileError:
    return WeightFileError(f"{path} is not a checkpoint: it holds neither safetensors nor PyTorch weights (a web "
                           "page or text saved under this name?). Download the model file itself again.")


def _missing(path: Path) -> WeightFileError:
    return WeightFileError(f"{path} does not exist: check the path (on Colab: is Drive mounted?).")


# --- safetensors -------------------------------------------------------------------------------

@contextmanager
def open_safetensors(path: str | Path):
    """safetensors' `safe_open` (tensors read one at a time), its errors naming the file. The
    header is checked against the file size when opened, so a truncated file fails here."""
    from safetensors import SafetensorError, safe_open  # lazy: loads safetensors

    path = Path(path)
    try:
        handle = safe_open(str(path), "pt")
    except FileNotFoundError:
        raise _missing(path) from None
    except SafetensorError as e:
        # safetensors 0.4 says 'HeaderTooLarge', later releases 'header too large'
        too_large = "headertoolarge" in str(e).lower().replace(" ", "")
        raise (not_weights(path) if too_large else damaged(path, str(e))) from None
    with handle as f:
        try:
            yield f
        except SafetensorError as e:
            raise damaged(path, str(e)) from None


def read_safetensors(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A whole safetensors file; cast tensor by tensor when `dtype` is given (never two full
    copies in RAM)."""
    with open_safetensors(path) as f:
        return {k: (f.get_tensor(k) if dtype is None else f.get_tensor(k).to(dtype)) for k in f.keys()}


# --- pickles ----------------------------------------------------------------------------------

def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except FileNotFoundError:
        raise _missing(path) from None


def read_pickle(path: str | Path):
    """`torch.load(weights_only=True)` of a `.ckpt` / `.pt` / `.bin`, memory-mapped when the
    format allows (a 4 GB file stays out of RAM until a tensor is used)."""
    path = Path(path)
    head = _head(path)
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise not_weights(path)
    try:
        if head.startswith(ZIP_MAGIC):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        if "truncated" in str(e) or "EOF" in str(e):
            raise damaged(path, "the pickle ends early") from None
        culprit = next((line for line in str(e).splitlines() if "GLOBAL" in line), "")
        raise UnsafeCheckpointError(
            f"{path} is a .ckpt whose pickle asks to run code or build objects other than tensors, "
            "so dbnb did not open it (it could run anything). Use the model's .safetensors version, "
            f"or convert it on a machine you trust. {culprit}".strip()) from None
    except Exception as e:  # noqa: BLE001 — zip directory, short data, struct errors: the file is bad
        raise damaged(path, str(e).split(". ")[0]) from None


# --- either -----------------------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a single weight file (an SD checkpoint's `state_dict` unwrapped)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_safetensors(path)
    data = read_pickle(path)
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise WeightFileError(f"{path} holds a {type(data).__name__}, not a state dict of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def check(path: str | Path) -> None:
    """Raise WeightFileError unless the file looks whole, without reading its tensors:
    safetensors' header against the file size, a zip pickle's central directory."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        with open_safetensors(path):
            return
    head = _head(path)
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path):
                return
        except (zipfile.BadZipFile, OSError) as e:
            raise damaged(path, str(e)) from None
    if not head.startswith(PICKLE_MAGIC):
        raise not_weights(path)
