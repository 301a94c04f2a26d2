"""The model hashes AUTOMATIC1111's webui shows and training reports cite: SHA-256, its 10-hex
short form, and the pre-2023 8-hex "model hash"."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dbnb.family.sd1.singlefile import weight_files


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 of a model file (the webui's hash); of a diffusers folder, of its UNet, VAE and
    text-encoder weight files read in that order (not a webui hash: the webui has no folders)."""
    digest = hashlib.sha256()
    for file in weight_files(Path(path)):
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's short model hash: the first 10 hex digits of the file's SHA-256."""
    return sha256_of(path)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """The webui's pre-2023 8-hex "model hash" (64 KiB at 1 MiB), which older reports cite."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
