"""Where dbnb runs, where its files survive, and the `dbnb doctor` preflight report.

Colab and Paperspace sessions end without warning, and their GPUs come with whatever
xformers / bitsandbytes wheels happen to be installed. Before a long run starts, this
module answers: which platform is this, where do outputs survive a lost session, is there
disk for the next save, and which optional accelerators actually *work*. Each accelerator
check runs a tiny real op, because a broken CUDA wheel usually imports fine and only
fails on its first kernel launch — hours into training.
"""
from __future__ import annotations

import errno
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from dbnb.errors import DbnbError

if TYPE_CHECKING:
    import torch

GIB = 1024 ** 3
MIN_PYTHON = (3, 10)
REQUIRED_PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors",
                     "huggingface_hub")
# SD 1.5 exports are 2–4 GB each, and a run keeps checkpoints besides.
DISK_WARN_BYTES = 10 * GIB

COLAB_MOUNT = "content/drive"            # relative to the root; Colab's documented mount point
COLAB_MYDRIVE = "content/drive/MyDrive"

SDPA_FALLBACK = "PyTorch SDPA (torch.nn.functional.scaled_dot_product_attention)"
ADAMW_FALLBACK = "torch.optim.AdamW"
CPU_ONLY = ("no CUDA GPU: training will run on CPU only "
            "(fine for `dbnb demo`, far too slow for SD 1.5 at 512 px)")


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


# --------------------------------------------------------------------------- disk space

class DiskFullError(DbnbError, OSError):
    """Not enough free disk for a save. `.needed`, `.free` (bytes) and `.path` say why."""

    def __init__(self, message: str, *, needed: int = 0, free: int = 0,
                 path: Path | None = None):
        # One positional arg only, so the exception pickles (e.g. across accelerate workers).
        super().__init__(message)
        self.errno = errno.ENOSPC
        self.needed, self.free, self.path = needed, free, path


def _nearest_existing(path: str | os.PathLike[str]) -> Path:
    # output_dir is often not created yet; its disk is that of the closest existing parent.
    current = Path(path).expanduser().absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the disk holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_nearest_existing(path)).free


def check_free_space(path: str | os.PathLike[str], needed_bytes: int, what: str,
                     advice: str | Callable[[], str] = "Free some space there, or write to another folder.") -> int:
    """Raise DiskFullError unless `needed_bytes` fit at `path`; return the free bytes.

    Called before every save, so a full disk fails with a clear message instead of a
    half-written checkpoint. `advice`: what to do, in the caller's terms (what can be deleted,
    which setting chooses another place); a callable is asked only when the space is short.
    """
    where = _nearest_existing(path)
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
    from safetensors import SafetensorError

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


# --------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Check:
    """One line of the doctor report. A failed optional check is a warning, not an error."""
    name: str
    ok: bool
    detail: str
    required: bool = False
    fallback: str | None = None  # what dbnb uses instead when this is not ok

    @property
    def marker(self) -> str:
        if self.ok:
            return "✓"
        return "✗" if self.required else "!"


def _reason(exc: BaseException) -> str:
    """'ImportError: libcudart.so.12: cannot open ...' — one line, short enough to print."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unusable(module: str, exc: Exception) -> str:
    # "Not installed" is normal and needs no traceback text; anything else is a broken install.
    if isinstance(exc, ModuleNotFoundError) and exc.name == module:
        return "not installed"
    return f"not usable ({_reason(exc)})"


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _on_cuda(device: str | torch.device | None) -> bool:
    import torch
    device = _default_device() if device is None else device
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def check_xformers(device: str | torch.device | None = None) -> Check:
    """Usable only if memory_efficient_attention really runs on the GPU (xformers.ops is the
    part that loads the compiled kernels, so importing it is part of the check)."""
    return _smoke_check(("xformers", "xformers.ops"), device, _xformers_smoke,
                        "memory_efficient_attention runs", SDPA_FALLBACK)


def _smoke_check(modules: tuple[str, ...], device, smoke: Callable, runs: str, fallback: str) -> Check:
    """An optional GPU library, usable only if `smoke` really runs on the GPU: an installed wheel
    proves nothing (built for another CUDA or torch, a missing .so), and broken wheels raise
    anything at import (ImportError, OSError, RuntimeError), so every failure becomes a Check."""
    name = modules[0]
    try:
        module = importlib.import_module(name)
        for part in modules[1:]:
            importlib.import_module(part)
        version = getattr(module, "__version__", "?")
        if not _on_cuda(device):
            return Check(name, False, f"{version} installed, but needs a CUDA GPU", fallback=fallback)
        smoke(device)
        return Check(name, True, f"{version}: {runs}")
    except Exception as exc:
        return Check(name, False, _unusable(name, exc), fallback=fallback)


def _xformers_smoke(device: str | torch.device) -> None:
    import torch
    import xformers.ops
    # (batch, tokens, heads, head_dim) with SD 1.5's head_dim of 40, which some builds lack.
    q = torch.randn(1, 16, 2, 40, device=device, dtype=torch.float16)
    out = xformers.ops.memory_efficient_attention(q, q, q)
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        raise RuntimeError("memory_efficient_attention returned non-finite values")


def check_bitsandbytes(device: str | torch.device | None = None) -> Check:
    """Usable only if one AdamW8bit step really runs on the GPU."""
    return _smoke_check(("bitsandbytes",), device, _bnb_smoke, "AdamW8bit step runs", ADAMW_FALLBACK)


def _bnb_smoke(device: str | torch.device) -> None:
    import bitsandbytes as bnb
    import torch
    # 64×64 = 4096 elements: below bnb's min_8bit_size (4096) it silently keeps 32-bit
    # state and the 8-bit kernels would not be exercised at all.
    param = torch.nn.Parameter(torch.ones(64, 64, device=device))
    param.grad = torch.ones_like(param)
    bnb.optim.AdamW8bit([param], lr=1e-3).step()
    torch.cuda.synchronize()
    if not torch.isfinite(param).all() or bool((param == 1).all()):
        raise RuntimeError("AdamW8bit step did not update the parameter")


# bf16 math runs natively from Ampere on (compute capability 8.0: A100, L4, RTX 30xx). Since
# torch 2.3, torch.cuda.is_bf16_supported() says yes on a T4 or V100 as well: it counts
# emulation, which runs there far slower than fp16.
BF16_MIN_CAPABILITY = (8, 0)


def has_bf16(device: int | str | torch.device | None = None) -> bool:
    """Whether the CUDA GPU `device` (the current one by default) computes in bf16 natively."""
    import torch
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def cuda_summary() -> dict | None:
    """The current GPU as a dict (name, total_vram_gib, free_vram_gib, capability, bf16),
    or None without CUDA. capability is a (major, minor) tuple."""
    import torch
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "total_vram_gib": round(total / GIB, 2),
        "free_vram_gib": round(free / GIB, 2),
        "capability": tuple(torch.cuda.get_device_capability(index)),
        "bf16": has_bf16(index),
    }


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
    from dbnb import versions

    problems = versions.outside_tested()
    if problems:
        # The stack too: a bug report needs it most when something is outside the tested range.
        return Check("versions", False, "; ".join(problems) + " (tested: setup.cfg's minimums up to "
                     f"dbnb.versions.NEWEST_TESTED). Include this line in a bug report: {versions.stack_line()}")
    return Check("versions", True, f"all within the tested range: {versions.stack_line()}")


def _check_cuda() -> Check:
    gpu = cuda_summary()
    if gpu is None:
        return Check("cuda", False, CPU_ONLY + _cpu_torch_hint())
    major, minor = gpu["capability"]
    bf16 = "yes" if gpu["bf16"] else "no (fp16 only)"
    return Check("cuda", True, f"{gpu['name']}, {gpu['total_vram_gib']:.1f} GiB VRAM "
                 f"({gpu['free_vram_gib']:.1f} GiB free), compute {major}.{minor}, bf16 {bf16}")


def _cpu_torch_hint() -> str:
    # A driver without CUDA in torch usually means pip replaced the platform's CUDA torch.
    if not (shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists()):
        return ""
    import torch
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
    return (f" — but an NVIDIA driver is present and torch {torch.__version__} is built for "
            f"{build}: reinstall the CUDA torch this platform ships")


def _check_disk(output_dir: str | os.PathLike[str]) -> Check:
    where = _nearest_existing(output_dir)
    free = shutil.disk_usage(where).free
    if free < DISK_WARN_BYTES:
        return Check("disk", False, f"only {format_bytes(free)} free at {where}: SD 1.5 exports "
                     "are 2–4 GB each; free space or choose another output_dir")
    return Check("disk", True, f"{format_bytes(free)} free at {where}")


def _check_ram() -> Check:
    # Only reported: Colab's free tier has ~12 GiB, which is enough with the right profile.
    import psutil
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
                         "is lost when the session ends; call dbnb.env.mount_drive()")
        return Check("storage", True, f"Google Drive mounted: {path}")
    if platform == "paperspace":
        note = "" if path.parent.name == "storage" else " (/storage missing or read-only)"
        return Check("storage", True, f"{path}{note}")
    return Check("storage", True, _NO_SESSION_STORAGE.get(platform, "output stays in output_dir"))


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
