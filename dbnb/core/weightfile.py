"""Writing a weight file so that no reader ever sees half of it: under a hidden temporary name
in the target folder, renamed into place only when complete; the leftovers of a killed write
found and deleted. Any family's single file (dbnb.family.sd1.layout) and a LoRA file
(dbnb.ship.export) are written through it; `.safetensors` with its metadata sorted, so the same
content hashes the same.
"""
from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping

import torch

# What `write_atomically` names its file while writing it; and how long a live writer's file
# can go unchanged before a leftover of a killed one is assumed.
TMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
IDLE_WRITER_S = 120

# writer(temporary path, state dict, metadata, global_step, the final name's stem)
Writer = Callable[[Path, Mapping[str, torch.Tensor], dict, "int | None", str], None]


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the hidden temporary files a killed write left in `folder` (a GB each)."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if TMP_NAME.match(p.name) and p.is_file() and time.time() - p.stat().st_mtime > IDLE_WRITER_S:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
    return metadata


def write_atomically(path: str | os.PathLike, writer: Writer, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None, global_step: int | None = None) -> Path:
    """`writer` writes `state_dict` to a temporary file beside `path`, renamed to `path` only when
    complete, so an interrupted write never leaves a truncated file under the real name (which a
    webui would list and then fail to load). Returns `path`."""
    path = Path(path)
    metadata = check_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is an atomic rename on one filesystem; the dot hides it from
    # model pickers while it is being written.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # safetensors creates its file owner-only (0600); keep the permissions any new file in
        # this folder gets, so e.g. a webui running as another user can read the export.
        tmp.touch(exist_ok=False)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        writer(tmp, state_dict, metadata, global_step, path.stem)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_safetensors(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """`state_dict` as one `.safetensors` file at `path`, written atomically."""
    return write_atomically(path, save_safetensors, state_dict, metadata)


def save_safetensors(tmp: Path, state_dict: Mapping[str, torch.Tensor],
                     metadata: dict[str, str], global_step: int | None, stem: str) -> None:
    """A `Writer`: the `global_step`, if any, goes in the metadata, where safetensors' readers look."""
    from safetensors.torch import save_file  # lazy: safetensors, only where a file is written

    # safetensors refuses non-contiguous tensors; .contiguous() is free for the ones that are.
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}
    if global_step is not None:
        metadata = {**metadata, "global_step": str(global_step)}
    save_file(tensors, str(tmp), metadata=metadata or None)
    sort_safetensors_metadata(tmp)


def sort_safetensors_metadata(path: Path) -> bool:
    """Sort a safetensors file's metadata in place, so the same content hashes the same.

    safetensors writes `__metadata__` in a random (Rust HashMap) order (safetensors#584), so two
    identical saves differ in bytes and in the webui's hash. The sorted header has the same
    length, so only header bytes change; False (file untouched) if it would not fit."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return True
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            return False
        f.seek(8)
        f.write(text.ljust(size, b" "))  # the format pads the header with spaces
        f.flush()
        os.fsync(f.fileno())
    return True
