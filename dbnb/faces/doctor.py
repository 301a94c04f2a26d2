"""`dbnb doctor`: the preflight report before a long run (python, packages, versions, CUDA,
accelerators, disk, RAM, platform, storage), which reports and never raises."""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from dbnb.core import versions
from dbnb.core.disk import DISK_WARN_BYTES, format_bytes, nearest_existing
from dbnb.core.hardware import (CPU_ONLY, Check, _default_device, _reason, check_bitsandbytes, check_xformers,
                                cuda_summary)
from dbnb.core.platform import detect_platform, persistent_dir

MIN_PYTHON = (3, 10)
REQUIRED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors",
                     "huggingface_hub")


# --------------------------------------------------------------------------- doctor

@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False only if a required check failed; warnings do not block a run."""
        return all(check.ok for check in self.checks if check.required)

    def get(self, name: str) -> Check | None:
        return next((check for check in self.checks if check.name == name), None)

    def format(self) -> str:
        """One aligned line per check (✓ ok, ! warning, ✗ required and failed), a summary last."""
        width = max((len(check.name) for check in self.checks), default=0)
        lines = []
        for check in self.checks:
            lines.append(f"{check.marker} {check.name:<{width}}  {check.detail}")
            if check.fallback and not check.ok:
                lines.append(f"  {'':<{width}}  → will use {check.fallback}")
        lines.append(self._summary())
        return "\n".join(lines)

    def _summary(self) -> str:
        failed = [c.name for c in self.checks if c.required and not c.ok]
        warnings = sum(1 for c in self.checks if not c.required and not c.ok)
        if failed:
            return f"NOT READY: fix {', '.join(failed)} first (required)."
        return f"ready ({warnings} warning{'s' if warnings != 1 else ''})."


def run_doctor(output_dir: str | os.PathLike[str] = ".") -> DoctorReport:
    """Check everything a training run needs, without ever raising."""
    platform = detect_platform()
    device = _default_device()
    checks = [_guard("python", True, _check_python)]
    checks += [_guard(name, True, lambda name=name: _check_package(name))
               for name in REQUIRED_PACKAGES]
    checks += [
        _guard("versions", False, _check_versions),
        _guard("cuda", False, _check_cuda),
        *([_guard("plan", False, _check_plan)] if device == "cuda" else []),
        check_xformers(device),
        check_bitsandbytes(device),
        _guard("disk", False, lambda: _check_disk(output_dir)),
        _guard("ram", False, _check_ram),
        Check("platform", True, platform),
        _guard("storage", False, lambda: _check_storage(platform)),
    ]
    return DoctorReport(checks)


def _guard(name: str, required: bool, check: Callable[[], Check]) -> Check:
    # The doctor must report, never crash: a check that blows up is itself a finding.
    try:
        return check()
    except Exception as exc:
        return Check(name, False, f"check failed ({_reason(exc)})", required=required)


def _check_python() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= MIN_PYTHON:
        return Check("python", True, version, required=True)
    return Check("python", False, f"{version}: dbnb needs Python >= 3.10; pick a newer runtime",
                 required=True)


def _package_version(module: str) -> str:
    """Import `module` (a broken install fails here) and return its version."""
    imported = importlib.import_module(module)
    return getattr(imported, "__version__", None) or importlib.metadata.version(module)


def _check_package(module: str) -> Check:
    try:
        version = _package_version(module)
    except Exception as exc:
        return Check(module, False, f"not importable ({_reason(exc)}): "
                     f"pip install -U {module}", required=True)
    return Check(module, True, version, required=True)


def _check_versions() -> Check:
    # Outside the tested range is a warning: it often works, and the line tells a bug report why not.

    problems = versions.outside_tested()
    if problems:
        # The stack too: a bug report needs it most when something is outside the tested range.
        return Check("versions", False, "; ".join(problems) + " (tested: setup.cfg's minimums up to "
                     f"dbnb.core.versions.NEWEST_TESTED). Include this line in a bug report: {versions.stack_line()}")
    return Check("versions", True, f"all within the tested range: {versions.stack_line()}")


def _check_cuda() -> Check:
    gpu = cuda_summary()
    if gpu is None:
        return Check("cuda", False, CPU_ONLY + _cpu_torch_hint())
    major, minor = gpu["capability"]
    bf16 = "yes" if gpu["bf16"] else "no (fp16 only)"
    return Check("cuda", True, f"{gpu['name']}, {gpu['total_vram_gib']:.1f} GiB VRAM "
                 f"({gpu['free_vram_gib']:.1f} GiB free), compute {major}.{minor}, bf16 {bf16}")


def _check_plan() -> Check:
    # The default settings on this card, by the planner (`dbnb plan CONFIG` says it for a run's own).
    from dbnb.core.config import Config  # lazy: the planner loads torch and diffusers
    from dbnb.train.memory import verdict

    ok, line = verdict(Config(), cuda_summary())
    return Check("plan", ok, f"default settings, SD 1.5 at 512 px — {line}")


def _cpu_torch_hint() -> str:
    # A driver without CUDA in torch usually means pip replaced the platform's CUDA torch.
    if not (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        return ""
    import torch  # lazy: loads torch
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return (f" — but an NVIDIA driver is present and torch {torch.__version__} is built for "
            f"{build}: reinstall the CUDA torch this platform ships")


def _check_disk(output_dir: str | os.PathLike[str]) -> Check:
    where = nearest_existing(output_dir)
    free = shutil.disk_usage(where).free
    if free < DISK_WARN_BYTES:
        return Check("disk", False, f"only {format_bytes(free)} free at {where}: SD 1.5 exports "
                     "are 2–4 GB each; free space or choose another output_dir")
    return Check("disk", True, f"{format_bytes(free)} free at {where}")


def _check_ram() -> Check:
    # Only reported: Colab's free tier has ~12 GiB, which is enough with the right profile.
    memory = psutil.virtual_memory()
    return Check("ram", True, f"{format_bytes(memory.available)} available of "
                 f"{format_bytes(memory.total)}")


_NO_SESSION_STORAGE = {
    "kaggle": "only /kaggle/working is kept, and only when the notebook is saved as a version",
    "jupyter": "no session storage to worry about: output stays in output_dir",
    "terminal": "no session storage to worry about: output stays in output_dir",
}


def _check_storage(platform: str) -> Check:
    path = persistent_dir(platform)
    if platform == "colab":
        if path is None:
            return Check("storage", False, "Google Drive not mounted: everything under /content "
                         "is lost when the session ends; call dbnb.core.platform.mount_drive()")
        return Check("storage", True, f"Google Drive mounted: {path}")
    if platform == "paperspace":
        note = "" if path.parent.name == "storage" else " (/storage missing or read-only)"
        return Check("storage", True, f"{path}{note}")
    return Check("storage", True, _NO_SESSION_STORAGE.get(platform, "output stays in output_dir"))


