"""Make dbnb usable in this notebook runtime, keeping the platform's torch.

Colab gives each notebook a fresh runtime and dbnb is not on a package index, so every
notebook starts with the same install cell. Its few bootstrap lines make this module
importable — from the repository checkout the notebook sits in (Paperspace, local Jupyter),
from a wheel in the Drive / storage folder `dbnb/`, or by pip-installing `dbnb_package`
(a `git+https://` URL or a wheel path) — and `ensure()` then installs dbnb properly with its
dependencies where it only came from source. Standard library only: this runs before
dbnb's dependencies exist.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import dbnb
from dbnb.core.errors import DbnbError

EXTRAS = "bnb,prep"
# What a bug report needs to know about the stack (printed after every install cell).
STACK = ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes")
# The platform's own builds (CUDA torch on Colab / Paperspace) must never be replaced.
KEEP = ("torch", "torchvision", "torchaudio")

HOW_TO_GET_DBNB = (
    "dbnb is not installed in this runtime and was not found. Any one of these works:\n"
    "  1. Colab: put the dbnb wheel (dbnb-*.whl; `pip wheel . --no-deps -w dist/` in the repository "
    "makes it) in the Drive folder MyDrive/dbnb/, then run this cell again;\n"
    "  2. set dbnb_package in the settings cell to a `git+https://...` URL of the repository or "
    "to a wheel's path;\n"
    "  3. Paperspace / your own Jupyter: open the notebooks from a clone of the repository "
    "(git clone ...; the notebooks/ folder of the clone).\n"
    "dbnb がこのランタイムにありません。上の 3 つのどれかで用意してください（README の Notebooks 参照）。")


class InstallError(DbnbError):
    """dbnb or its dependencies could not be installed; the message says what to try."""


def origin() -> tuple[str, Path]:
    """Where the imported dbnb comes from: ("installed", package folder), ("checkout",
    repository root) or ("wheel", the .whl file put on sys.path)."""
    here = Path(dbnb.__file__).resolve().parent
    for parent in here.parents:
        if parent.suffix == ".whl":
            return "wheel", parent
    if _installed_here(here):
        return "installed", here
    if (here.parent / "setup.cfg").is_file():
        return "checkout", here.parent
    raise InstallError(f"dbnb was imported from {here}, which is neither an installed package, a wheel nor a "
                       f"repository checkout.\n{HOW_TO_GET_DBNB}")


def _installed_here(package: Path) -> bool:
    """Whether pip's record of dbnb is this very folder (a regular or an editable install)."""
    try:
        dist = importlib.metadata.distribution("dbnb")
    except importlib.metadata.PackageNotFoundError:
        return False
    direct = dist.read_text("direct_url.json")
    if direct and json.loads(direct).get("dir_info", {}).get("editable"):
        url = json.loads(direct)["url"]
        return url.startswith("file://") and Path(url[len("file://"):]).resolve() == package.parent
    try:
        return Path(dist.locate_file("dbnb/__init__.py")).resolve().parent == package
    except (TypeError, OSError):
        return False


def pip_arguments(kind: str, where: Path) -> list[str] | None:
    """What `pip install` needs for this origin; None when nothing is to be installed."""
    if kind == "installed":
        return None
    if kind == "checkout":
        return ["-e", f"{where}[{EXTRAS}]"]
    return [f"{where}[{EXTRAS}]"]


def kept_versions() -> list[str]:
    """`name==version` of the platform's builds that pip must keep."""
    out = []
    for name in KEEP:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def stack() -> str:
    """The versions a bug report needs, read from the installed metadata (nothing imported)."""
    parts = []
    for name in STACK:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def ensure(run=subprocess.run) -> str:
    """Install dbnb where it only came from source (checkout or wheel), its dependencies with
    it and the platform's torch pinned; keep an existing install. Returns what was done."""
    kind, where = origin()
    arguments = pip_arguments(kind, where)
    if arguments is None:
        done = f"dbnb {_version()} is installed ({where}): kept"
    else:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
            pins.write("\n".join(kept_versions()) + "\n")
        command = [sys.executable, "-m", "pip", "install", "-q", "-c", pins.name, *arguments]
        print("installing / インストール中:", " ".join(command[4:]), flush=True)
        result = run(command)
        Path(pins.name).unlink(missing_ok=True)
        if result.returncode != 0:
            raise InstallError(f"pip could not install dbnb from {where} (exit code {result.returncode}; its "
                               f"message is above). Check the network and the file, or:\n{HOW_TO_GET_DBNB}")
        _forget_source(where if kind == "wheel" else None)
        done = f"dbnb installed from {where}"
    return f"{done}. {stack()}"


def _version() -> str:
    try:
        return importlib.metadata.version("dbnb")
    except importlib.metadata.PackageNotFoundError:
        return "(source)"


def _forget_source(wheel: Path | None) -> None:
    # Modules imported from the wheel on sys.path would keep loading from the zip, where the
    # package data (the tiny models, the SD 1.5 configs) cannot be read as files.
    if wheel is not None:
        sys.path[:] = [p for p in sys.path if Path(p) != wheel]
        for name in [m for m in sys.modules if m == "dbnb" or m.startswith("dbnb.")]:
            del sys.modules[name]
    importlib.invalidate_caches()
