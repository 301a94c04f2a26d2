"""The model hashes AUTOMATIC1111's webui shows and training reports cite: SHA-256, its 10-hex
short form, and the pre-2023 8-hex "model hash"."""
from __future__ import annotations

import hashlib
import os


def sha256_of(*files: str | os.PathLike) -> str:
    """SHA-256 of a model file (the webui's hash); of several, of them read in the order given (a
    diffusers folder's weight files as its family lists them: not a webui hash, the webui has no folders)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def short_hash(*files: str | os.PathLike) -> str:
    """AUTOMATIC1111's short model hash: the first 10 hex digits of the file's SHA-256 (of the files', for several)."""
    return sha256_of(*files)[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """The webui's pre-2023 8-hex "model hash" (64 KiB at 1 MiB), which older reports cite."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
