"""What the GPU can do: CUDA, native bf16, and whether the optional accelerators (xformers,
bitsandbytes) really work. Each check runs a tiny real op, because a broken CUDA wheel usually
imports fine and only fails on its first kernel launch, hours into training."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from dbnb.core.disk import GIB

if TYPE_CHECKING:
    import torch

SDPA_FALLBACK = "PyTorch SDPA (torch.nn.functional.scaled_dot_product_attention)"
ADAMW_FALLBACK = "torch.optim.AdamW"
CPU_ONLY = ("no CUDA GPU: training will run on CPU only "
            "(fine for `dbnb demo`, far too slow for SD 1.5 at 512 px)")



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
        import torch  # lazy: optional torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def _on_cuda(device: str | torch.device | None) -> bool:
    import torch  # lazy: loads torch
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
    import torch  # lazy: loads torch
    import xformers.ops  # lazy: optional xformers, not always installed

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
    import bitsandbytes as bnb  # lazy: loads bitsandbytes
    import torch  # lazy: loads torch

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
    import torch  # lazy: loads torch
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


def cuda_summary() -> dict | None:
    """The current GPU as a dict (name, total_vram_gib, free_vram_gib, capability, bf16),
    or None without CUDA. capability is a (major, minor) tuple."""
    import torch  # lazy: loads torch
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


