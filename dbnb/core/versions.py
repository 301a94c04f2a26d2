"""The library versions dbnb runs with: the range it declares, the newest it was tested on,
and the few arguments whose names changed inside that range.

Colab and Paperspace update their preinstalled stack under the notebooks, so the range is a
promise that CI keeps at both ends: the full suite on the newest versions (`.ci/run`), the
fast suite on the declared minimums (`constraints-oldest.txt`). The minimums are declared
once, in setup.cfg's install_requires, and read back from there (a checkout) or from the
installed metadata; only the newest tested release series lives here.
"""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from dbnb import __version__

# The newest release series (major.minor) the full suite passed with; a patch release of
# one of these counts as tested. Raise an entry when `.ci/run` passes on a newer release.
NEWEST_TESTED = {
    "torch": "2.13",
    "diffusers": "0.42",
    "transformers": "5.25",
    "accelerate": "1.16",
    "safetensors": "0.8",
    "huggingface-hub": "2.4",
    "numpy": "2.4",
    "packaging": "26.4",
    "pillow": "13.0",
    "gdown": "6.5",
    "tqdm": "4.70",
    "ipywidgets": "8.1",
    "pyyaml": "6.0",
    "psutil": "7.2",
    "matplotlib": "3.11",
    "peft": "0.21",
}
# Where the oldest version tested lies above the declared minimum. torch is declared as low as
# dbnb's own calls allow (register_post_accumulate_grad_hook, torch.load(mmap=True): 2.1)
# because the platform's CUDA build must be kept, never replaced; but CI has only this
# machine's CPU wheel (2.13). The GPU machine has 2.11 (shared/field-notes.md), but the GPU
# suite (bench/gpu_suite.py) has not run there yet: raise this to 2.11 when it has.
OLDEST_TESTED = {"torch": "2.13"}

# The release that renamed `torch_dtype` to `dtype` in from_pretrained / from_single_file.
# Before it the new name is ignored with a warning (the model silently loads in fp32), after it
# the old one is deprecated.
DTYPE_RENAMED = {"diffusers": "0.40", "transformers": "4.56"}


def _canonical(name: str) -> str:
    return canonicalize_name(name)


def requirement_lines() -> list[str]:
    """dbnb's own install_requires: setup.cfg beside the package when running from a checkout
    (its metadata may be an older install's), the installed metadata otherwise."""
    setup_cfg = Path(__file__).resolve().parents[2] / "setup.cfg"
    if setup_cfg.is_file():
        parser = configparser.ConfigParser()
        parser.read(setup_cfg, encoding="utf-8")
        return [line for line in parser["options"]["install_requires"].splitlines() if line.strip()]
    return [line for line in importlib.metadata.requires("dbnb") or () if "extra ==" not in line]


def declared() -> dict:
    """{canonical name: SpecifierSet} of every dependency dbnb always needs."""
    requirements = [Requirement(line) for line in requirement_lines()]
    return {_canonical(r.name): r.specifier for r in requirements if r.marker is None or r.marker.evaluate()}


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _series(version) -> tuple[int, int]:
    release = (*version.release, 0)
    return release[0], release[1]


def outside_tested(versions: dict[str, str | None] | None = None) -> list[str]:
    """One sentence per dependency that is missing, outside the declared range, or outside the
    tested one; empty when the whole stack is what CI tests. `versions` maps names to installed
    versions (default: this environment's)."""
    problems = []
    for name, specifier in declared().items():
        got = versions.get(name) if versions is not None else installed_version(name)
        if got is None:
            problems.append(f"{name} is not installed (dbnb needs {name}{specifier})")
            continue
        version = Version(got)
        newest, oldest = NEWEST_TESTED.get(name), OLDEST_TESTED.get(name)
        if not specifier.contains(version, prereleases=True):
            problems.append(f"{name} {got} is outside what dbnb declares ({specifier})")
        elif newest and _series(version) > _series(Version(newest)):
            problems.append(f"{name} {got} is newer than the newest tested ({newest}.x)")
        elif oldest and version < Version(oldest):
            problems.append(f"{name} {got} is older than the oldest tested ({oldest})")
    return problems


def stack_line(versions: dict[str, str | None] | None = None) -> str:
    """'torch 2.13.0, diffusers 0.42.1, …' for every declared dependency."""
    names = declared()
    got = versions if versions is not None else {name: installed_version(name) for name in names}
    return ", ".join(f"{name} {got.get(name) or '(not installed)'}" for name in names)


def dtype_argument(library: str, dtype) -> dict:
    """The keyword that sets a model's dtype in this `library`'s loaders: `dtype` from the
    release that renamed it, `torch_dtype` before (see DTYPE_RENAMED)."""
    version = installed_version(library)
    if version is not None and Version(version) < Version(DTYPE_RENAMED[library]):
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def dbnb_commit() -> str | None:
    """The git commit of the dbnb that is running: its checkout's HEAD (a clone, an editable
    install; "+ local changes" when dbnb/ differs from it), else the commit pip recorded when it
    installed dbnb from git+https://; None for a wheel. The seed's reports pin their trainer the
    same way (the extension's commit)."""
    package = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        top, commit = head.stdout.split() if head.returncode == 0 else ("", "")
        if top and (Path(top) / "dbnb" / "__init__.py").resolve() == package / "__init__.py":
            # this checkout's own commit, not one of an enclosing repository
            changed = subprocess.run(["git", "-C", top, "diff", "--quiet", "HEAD", "--", "dbnb"],
                                     capture_output=True, timeout=10).returncode == 1
            return commit + (" + local changes" if changed else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # no git, or not a checkout: what pip recorded, if anything
    try:
        direct = importlib.metadata.distribution("dbnb").read_text("direct_url.json")
        return json.loads(direct or "{}").get("vcs_info", {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def dbnb_version() -> str:
    """'dbnb 0.1.0, commit <40 hex>' (or without the commit): what a run records as its trainer."""
    commit = dbnb_commit()
    return f"dbnb {__version__}" + (f", commit {commit}" if commit else "")
