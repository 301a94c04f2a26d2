"""Disk space and writability: free bytes, the check before a save, telling a full disk
from other write errors, and sizes as users read them."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

from dbnb.core.errors import DbnbError

GIB = 1024 ** 3
# SD 1.5 exports are 2–4 GB each, and a run keeps checkpoints besides.
DISK_WARN_BYTES = 10 * GIB


# --------------------------------------------------------------------------- disk space

class DiskFullError(DbnbError, OSError):
    """Not enough free disk for a save. `.needed`, `.free` (bytes) and `.path` say why."""

    def __init__(self, message: str, *, needed: int = 0, free: int = 0,
                 path: Path | None = None):
        # One positional arg only, so the exception pickles (e.g. across accelerate workers).
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.needed, self.free, self.path = needed, free, path


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    # output_dir is often not created yet; its disk is that of the closest existing parent.
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(nearest_existing(path)).free


def check_free_space(path: str | os.PathLike[str], needed_bytes: int, what: str,
                     advice: str | Callable[[], str] = "Free some space there, or write to another folder.") -> int:
    """Raise DiskFullError unless `needed_bytes` fit at `path`; return the free bytes.

    Called before every save, so a full disk fails with a clear message instead of a
    half-written checkpoint. `advice`: what to do, in the caller's terms (what can be deleted,
    which setting chooses another place); a callable is asked only when the space is short.
    """
    where = nearest_existing(path)
    free = shutil.disk_usage(where).free
    if needed_bytes > free:
        raise DiskFullError(
            f"Not enough disk space to save {what}: needs {format_bytes(needed_bytes)}, "
            f"only {format_bytes(free)} free at {where}. {advice() if callable(advice) else advice}",
            needed=needed_bytes, free=free, path=where)
    return free


class NotWritableError(DbnbError, OSError):
    """A folder dbnb must write into cannot be written (read-only, a file in the path, Drive gone)."""


def check_writable(folder: str | os.PathLike[str], what: str) -> None:
    """Make `folder` (and its parents) and prove a file can be written there, before the
    minutes of work whose result would go there."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dbnb-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NotWritableError(f"Cannot write {what} to {folder}: {why_not_made(folder, e)}. Choose another folder, or "
                               "check the mount (on Colab: is Drive still mounted?).") from None


def why_not_made(folder: Path, error: OSError) -> str:
    """Why `folder` could not be made, in words: a file in its path (a .zip or a document given
    for a folder) said as such, rather than the OS's "Not a directory" or "File exists"."""
    in_the_way = next((p for p in (folder, *folder.parents) if p.is_file()), None)
    return f"{in_the_way} is a file, not a folder" if in_the_way else str(error.strerror or error)


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write of weights raises: OSError, torch.save's RuntimeError, and safetensors'
    SafetensorError, which derives from Exception only (diffusers' and transformers' save_pretrained
    write through it, so a full disk there is neither an OSError nor a RuntimeError)."""
    from safetensors import SafetensorError  # lazy: loads safetensors

    return OSError, RuntimeError, SafetensorError


def is_disk_full(e: BaseException) -> bool:
    """Whether a failed write ran out of disk. torch.save says so only as 'unexpected pos'
    (its zip writer), safetensors as 'os error 28' in a SafetensorError."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return isinstance(e, write_errors()) and any(
        part in text for part in ("unexpected pos", "No space left", "os error 28", "Disk quota exceeded"))


def format_bytes(n: float) -> str:
    """1536 → '1.50 KiB'; GiB is the largest unit (disks and VRAM read best in it)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


