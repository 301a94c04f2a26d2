"""`deterministic=true`: one config gives one set of weights, bit for bit, and a resume adds no
difference of its own.

On a CPU the one source found (issue 36) is MKL's sgemm inside the UNet's Conv2d backward where
the feature map is 1x1 (the 3x3 convs of the lowest level: the slow_conv2d / im2col path, which
oneDNN does not take, so `torch.backends.mkldnn.enabled = False` changes nothing). With two or
more threads MKL splits that product differently from call to call, so the input gradient differs
by ~1e-7 between repeats; `torch.use_deterministic_algorithms(True)` does not cover MKL either.
MKL's strict reproducible mode (MKL_CBWR=AUTO,STRICT) cures it, but only when set before MKL's
first call in the process — too late once torch has run — so here the backward runs on one
thread; the forward and the optimizer keep all threads.

On a GPU: torch's deterministic algorithms, cuDNN without autotuning, and the cuBLAS workspace
setting that its deterministic mode requires.
"""
from __future__ import annotations

import contextlib
import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(on: bool, device: torch.device):
    """Switch the process to reproducible kernels for one training, then put every global it
    changed back: tests and notebooks run many trainings in one process."""
    if not on or device.type != "cuda":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    # cuBLAS reads it when a handle is first made; torch checks it at every call in this mode.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        algorithms, warn_only, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, workspace = saved
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextlib.contextmanager
def backward_threads(on: bool, device: torch.device):
    """Around one backward: a single CPU thread when deterministic on a CPU (see above)."""
    threads = torch.get_num_threads()
    if not on or device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
