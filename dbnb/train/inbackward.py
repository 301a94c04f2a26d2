"""Optimizer in backward: each weight is stepped the moment its gradient is ready, then the
gradient is freed, so the model's full-size gradients never all exist at the same time.

Why it stays (issue 31, item 6): measured on a 2-core CPU box (commit 0c1d3fb), the full SD 1.5
UNet at 256 px peaks at 10.76 GiB RSS instead of 13.77 (-3.0 GiB: the gradients never all live at
once); computed, a full SDXL fine-tune in bf16 on a 24 GB L4 needs it (the fp32 gradients of its
2.6 B parameters are ~10.3 GB). It refuses fp16 with a config error naming why, never a silent
fp32 run. bench/gpu_suite.py's profile 9 measures it on a GPU.

Why it saves VRAM. In the normal path `loss.backward()` fills `.grad` for every trained
tensor and only then does `optimizer.step()` read them, so at the step the GPU holds the
weights, the optimizer state *and one gradient per weight*: for the SD 1.5 UNet (860 M
parameters) that is ~3.4 GB of fp32 gradients on top of ~3.4 GB of fp32 master weights.
Here a post-accumulate-grad hook on each parameter runs that parameter's own optimizer as
soon as autograd has finished accumulating its gradient, and sets `.grad = None` at once.
Peak gradient memory falls from all of the UNet's gradients to the few tensors whose
gradients are alive at the same moment of backward (the largest UNet tensors are ~10-30 MB
each), i.e. about 3.4 GB less at the step — what separates a full-UNet fp32-master run at
512 px from an 8 GB card. Activations, weights and the Adam state are unchanged (8-bit Adam
still shrinks the latter).

It computes the same update as the normal path (tests/test_inbackward.py checks it on the
tiny model, bit for bit on the CPU): every gradient is complete when its hook fires — the
hook runs after autograd has accumulated every contribution to that parameter, and every
backward node that saved the parameter has run by then, so updating it in place cannot
change any other gradient — and AdamW updates each tensor independently. Gradient
checkpointing works too (a checkpointed segment is recomputed before its parameters' hooks
fire).

What it cannot do, and why (the config refuses the settings when it is built, so the form does at
once; `check_supported` adds the process count at training):

* gradient_accumulation_steps > 1 — gradients are consumed as they are produced; there is
  nothing left to add the next micro-batch to.
* max_grad_norm > 0 — clipping by the global norm needs every gradient at once, before
  any step; the first parameters are stepped before the last gradients exist.
* several processes (DDP) — the hook fires when the local gradient is ready, before DDP's
  all-reduce has averaged it, so each GPU would step with its own gradient and drift apart.
* mixed_precision=fp16 — the GradScaler's unscale and its skip-the-step-on-inf/NaN happen
  after the whole backward; here every parameter has already been stepped with its scaled
  gradient by then. bf16 (no scaler) and no are fine.

Use: build it from the param groups and AdamW keyword arguments the trainer already makes,
plus the optimizer class (or any callable `make(param_groups, **kwargs)`):

    optimizer = OptimizerInBackward(groups, torch.optim.AdamW, betas=..., weight_decay=..., eps=...)
    lr_scheduler = get_scheduler("polynomial", optimizer, ...)   # works as with a normal optimizer
    loss.backward()           # steps every parameter and frees its gradient
    optimizer.step()          # no-op (kept so the training loop is unchanged)
    optimizer.zero_grad()     # no-op
    lr_scheduler.step()

The object is itself a `torch.optim.Optimizer` over the same groups — the "schedule holder"
that LR schedulers read and write — but it never steps for real. Each hook copies its group's
current hyper-parameters (`lr` above all) into the parameter's own optimizer before stepping
it, so the schedule reaches every parameter with no extra call. `state_dict()` has exactly the
layout of `torch.optim.AdamW(groups).state_dict()` (states keyed by parameter position over
all groups), so a checkpoint written by either path resumes the other, and it loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch

from dbnb.core.config import ConfigError, inbackward_conflicts

# The settings it excludes are refused when the config is built (dbnb.core.config
# `inbackward_conflicts`, so the form refuses them at once); the process count is known only here.
_WHY_PROCESSES = (
    "with several processes (DDP) each weight's hook fires before DDP's all-reduce has averaged "
    "its gradient, so every GPU would step with its own gradient and the copies would drift "
    "apart. Train on one GPU")


def unsupported_settings(config, num_processes: int = 1) -> list[str]:
    """One line per setting of `config` that optimizer-in-backward cannot honour (empty: fine)."""
    found = inbackward_conflicts(config)
    if num_processes > 1:
        found.append(f"{num_processes} processes: {_WHY_PROCESSES}.")
    return found


def check_supported(config, num_processes: int) -> None:
    """Raise a `ConfigError` (a `ValueError`) naming every setting that rules out
    optimizer_in_backward and what to change; return None when all is well."""
    found = unsupported_settings(config, num_processes)
    if found:
        raise ConfigError("optimizer_in_backward=true cannot be used with:\n  - " + "\n  - ".join(found)
                          + "\nChange these, or set optimizer_in_backward=false.")


def _as_group(group: dict) -> dict:
    """A param group with its params as a list (a generator would be used up by the probe)."""
    params = group["params"]
    return {**group, "params": [params] if isinstance(params, torch.Tensor) else list(params)}


class OptimizerInBackward(torch.optim.Optimizer):
    """Steps each parameter's own optimizer inside backward and frees its gradient.

    `param_groups`: what you would give the optimizer, `[{"params": [...], "lr": ...}, ...]`.
    `make(param_groups, **kwargs)`: builds one optimizer (called once per parameter with a
    one-parameter group), e.g. `torch.optim.AdamW`, `functools.partial(torch.optim.AdamW,
    fused=True)` or `bitsandbytes.optim.AdamW8bit`. `kwargs`: its keyword arguments (betas,
    weight_decay, eps, ...), also the groups' defaults here, as in any torch optimizer.
    `track_grad_norm`: also sum each gradient's squared norm as it goes by, so that after
    `step()` `grad_norm` is the global L2 norm of the last backward's gradients (one small
    reduction per tensor; off by default).

    Parameters that do not require grad get no hook (and, as in the normal path, no step).
    """

    def __init__(self, param_groups: Iterable, make: Callable = torch.optim.AdamW, *,
                 track_grad_norm: bool = False, **kwargs):
        if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise RuntimeError("optimizer_in_backward needs torch >= 2.1 (Tensor.register_post_accumulate_grad_hook).")
        self._make, self._kwargs = make, dict(kwargs)
        self._inner: list[torch.optim.Optimizer] = []  # one per parameter, in parameter order
        self._handles: list = []
        self._seen: set[int] = set()
        self._track = track_grad_norm
        self._sq_sum: torch.Tensor | None = None
        self.grad_norm_tensor: torch.Tensor | None = None  # read by the caller when it reads its figures
        param_groups = list(param_groups)
        if param_groups and not isinstance(param_groups[0], dict):  # plain parameters: one group
            param_groups = [{"params": param_groups}]
        param_groups = [_as_group(g) for g in param_groups]
        first = next((p for g in param_groups for p in g["params"]), None)
        # The defaults a normal `make(groups, **kwargs)` would have (its constructor's lr too:
        # diffusers' polynomial schedule reads optimizer.defaults["lr"]). The probe sits on the
        # parameters' device (torch < 2.4 refuses fused=True for a CPU tensor).
        probe = make([torch.nn.Parameter(torch.zeros(1, device=first.device if first is not None else "cpu"))],
                     **kwargs)
        super().__init__(param_groups, dict(probe.defaults))

    # --- building ----------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # validates, fills the defaults
        group = self.param_groups[-1]
        if "lr" not in group:
            raise ValueError("OptimizerInBackward: every param group needs an 'lr' (or pass lr=...): "
                             "LR schedules read and write it.")
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        synced = tuple(hyper)  # copied from the group into each parameter's optimizer at every step
        for p in group["params"]:
            if id(p) in self._seen:
                raise ValueError("OptimizerInBackward: a parameter is listed twice; it would be stepped twice.")
            self._seen.add(id(p))
            inner = self._make([{**hyper, "params": [p]}], **self._kwargs)
            self._inner.append(inner)
            if p.requires_grad:
                hook = functools.partial(self._step_one, inner, group, synced)
                self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def _step_one(self, inner: torch.optim.Optimizer, group: dict, synced: tuple, p: torch.Tensor) -> None:
        """The hook: this parameter's gradient is complete; step it with the group's current
        hyper-parameters (the LR schedule's lr) and free the gradient. Autograd runs hooks
        under no_grad."""
        own = inner.param_groups[0]
        for k in synced:
            own[k] = group[k]
        if self._track:
            sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
            self._sq_sum = sq if self._sq_sum is None else self._sq_sum + sq
        inner.step()
        p.grad = None

    def remove(self) -> None:
        """Drop the hooks: later backwards leave `.grad` in place and step nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # --- what the training loop calls ------------------------------------------------------------
    def step(self, closure=None):
        """No-op: the parameters were stepped during backward. A closure is evaluated (its
        backward does the stepping). With track_grad_norm, finishes `grad_norm`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._track:
            self.grad_norm_tensor = None if self._sq_sum is None else self._sq_sum.sqrt()
            self._sq_sum = None
        return loss

    @property
    def grad_norm(self) -> float | None:
        """The last step's gradient norm as a number (a host read: a GPU waits for its work)."""
        return None if self.grad_norm_tensor is None else float(self.grad_norm_tensor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: each gradient was freed as soon as its parameter was stepped."""

    @property
    def state(self) -> dict:
        """A read-only view: {parameter: its optimizer state}, like any torch optimizer's."""
        out = {}
        for inner in getattr(self, "_inner", ()):
            out.update(inner.state)
        return out

    @state.setter
    def state(self, value) -> None:
        pass  # torch.optim.Optimizer.__init__ assigns an empty one; the states live in self._inner

    # --- resume -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The layout of a torch optimizer's state_dict over the same groups: `state` keyed by
        the parameter's position over all groups, `param_groups` with `params` as positions.
        Tensors, numbers, tuples and dicts only, so `torch.load(weights_only=True)` reads it."""
        state, groups, index = {}, [], 0
        inner_iter = iter(self._inner)
        for group in self.param_groups:
            positions, extra = [], {}
            for _ in group["params"]:
                own = next(inner_iter).state_dict()
                if 0 in own["state"]:
                    state[index] = own["state"][0]
                if not extra:
                    extra = {k: v for k, v in own["param_groups"][0].items() if k != "params"}
                positions.append(index)
                index += 1
            groups.append({**extra, **{k: v for k, v in group.items() if k != "params"}, "params": positions})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what `state_dict()` wrote — or what the normal path's optimizer (same
        optimizer class, same groups) wrote: the layouts are the same."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("OptimizerInBackward.load_state_dict: the saved optimizer state has "
                             f"{[len(s['params']) for s in saved_groups]} parameters per group, this one "
                             f"{[len(g['params']) for g in self.param_groups]}: not the same model / settings.")
        saved_state = state_dict["state"]
        inner_iter = iter(self._inner)
        for group, saved in zip(self.param_groups, saved_groups):
            hyper = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            for position in saved["params"]:
                one = {"state": {0: saved_state[position]} if position in saved_state else {},
                       "param_groups": [{**hyper, "params": [0]}]}
                next(inner_iter).load_state_dict(one)
            group.update(hyper)  # lr / initial_lr as saved, as torch optimizers do
