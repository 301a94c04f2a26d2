"""Where dbnb runs (Colab, Paperspace, Kaggle, a terminal), where its files survive a lost
session (Drive, /storage), how paths are shown to the user, and where downloads are cached."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Mapping

COLAB_MOUNT = "content/drive"            # relative to the root; Colab's documented mount point
COLAB_MYDRIVE = "content/drive/MyDrive"


# --------------------------------------------------------------------------- platform

def detect_platform(environ: Mapping[str, str] | None = None,
                    root: str | os.PathLike[str] = "/") -> str:
    """"colab", "paperspace", "kaggle", "jupyter" or "terminal".

    `environ` and `root` default to the real ones; tests pass fakes. Order matters:
    Colab and Kaggle also run IPython kernels, so the generic "jupyter" comes last.
    """
    environ = os.environ if environ is None else environ
    root = Path(root)
    if _is_colab(environ):
        return "colab"
    if _is_paperspace(environ, root):
        return "paperspace"
    if "KAGGLE_KERNEL_RUN_TYPE" in environ:
        return "kaggle"
    if _in_notebook_kernel():
        return "jupyter"
    return "terminal"


def _is_colab(environ: Mapping[str, str]) -> bool:
    return "COLAB_RELEASE_TAG" in environ or "COLAB_GPU" in environ or _colab_importable()


def _colab_importable() -> bool:
    # find_spec avoids running google.colab's import-time code; it imports the parent
    # `google` namespace, which may be missing or half-installed (protobuf), hence the catch.
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def _is_paperspace(environ: Mapping[str, str], root: Path) -> bool:
    # Gradient notebooks export PAPERSPACE_* (NOTEBOOK_REPO_ID, METRIC_URL, ...); the
    # /notebooks + /storage pair is the fallback when a custom container drops them.
    if any(key.startswith("PAPERSPACE_") for key in environ):
        return True
    return (root / "notebooks").is_dir() and (root / "storage").is_dir()


def _in_notebook_kernel() -> bool:
    # Only look at sys.modules: importing IPython just to ask would be slow, and if it is
    # not loaded we are certainly not inside a kernel.
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:
        return False
    # Subclasses count too (Colab's shell derives from ZMQInteractiveShell).
    return any(cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__)


# --------------------------------------------------------------------------- storage

def drive_mounted(root: str | os.PathLike[str] = "/") -> bool:
    """Whether Google Drive is mounted at Colab's usual place."""
    return (Path(root) / COLAB_MYDRIVE).is_dir()


def persistent_dir(platform: str | None = None,
                   root: str | os.PathLike[str] = "/") -> Path | None:
    """Where dbnb output survives a lost session, or None if there is no such place.

    Colab → Drive (only once mounted); Paperspace → /storage, or /notebooks when /storage
    is missing or read-only. Elsewhere the local disk is already persistent, or there is
    no convention to follow. The directory is not created here.
    """
    root = Path(root)
    platform = platform or detect_platform(root=root)
    if platform == "colab":
        return root / COLAB_MYDRIVE / "dbnb" if drive_mounted(root) else None
    if platform == "paperspace":
        storage = root / "storage"
        if storage.is_dir() and _writable(storage):
            return storage / "dbnb"
        return root / "notebooks" / "dbnb"
    return None


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def mount_drive() -> Path:
    """Mount Google Drive on Colab (asks for permission once) and return dbnb's folder there."""
    platform = detect_platform()
    if platform != "colab":
        where = ("on Paperspace, /storage already persists: use persistent_dir()"
                 if platform == "paperspace" else "here, write to a local output_dir instead")
        raise RuntimeError(f"mount_drive() only works on Google Colab, but this is "
                           f"{platform!r}; {where}.")
    if not drive_mounted():
        drive = importlib.import_module("google.colab.drive")
        drive.mount("/" + COLAB_MOUNT)
    return Path("/") / COLAB_MYDRIVE / "dbnb"



# Set by the notebooks to their workspace: paths under it are shown relative to it.
WORKSPACE_VARIABLE = "DBNB_WORKSPACE"


def shown(path: str | os.PathLike[str]) -> str:
    """A path as a user should read it: relative to the notebooks' workspace when inside it
    (not /content/drive/MyDrive/dbnb/runs/... on every line), else as given."""
    path = Path(path)
    root = os.environ.get(WORKSPACE_VARIABLE)
    if root and path.is_absolute():
        try:
            return str(path.relative_to(root)) or "."
        except ValueError:
            pass
    return str(path)


def default_cache_dir() -> Path:
    """Where downloads and built skeletons are kept: $DBNB_CACHE, else ~/.cache/dbnb."""
    return Path(os.environ.get("DBNB_CACHE", Path.home() / ".cache" / "dbnb"))
