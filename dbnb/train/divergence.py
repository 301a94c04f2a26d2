"""Telling that a run diverged before its bad weights are saved: the gradient norm before
each optimizer step, a finiteness check of everything a checkpoint would hold, and which
saved checkpoint is still good."""
from __future__ import annotations

import torch


def gradient_norm(acc, optimizer, max_norm: float) -> torch.Tensor | None:
    """The global gradient norm before clipping (and clip when max_norm > 0), as a 0-d tensor
    the caller reads with the step's other figures. Under fp16's loss scaling an inf norm is
    routine (the scaler skips that step), so there it is measured only where clipping unscales
    the gradients anyway."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if max_norm > 0:
        return acc.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if acc.scaler is not None or not grads:
        return None
    # torch >= 2.6 has it fused; before, the same norm of the per-tensor norms
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if total_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return total_norm(grads)


def first_non_finite(parts: dict[str, list[torch.Tensor]]) -> str:
    """The name of the first part holding an inf or NaN, "" when none. One pass over the data:
    the max-abs norm of every tensor (inf or NaN exactly when the tensor holds one; finite values
    never overflow it, as a sum or L2 norm could in fp16), fused per device and dtype, then one
    read for all parts."""
    names = [name for name, tensors in parts.items() if tensors]
    finite = [_all_finite([t for t in parts[name] if t.numel()]) for name in names]
    if not finite:
        return ""
    home = finite[0].device
    flags = torch.stack([f.to(home) for f in finite]).tolist()
    return next((name for name, ok in zip(names, flags) if not ok), "")


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    if not groups:
        return torch.ones((), dtype=torch.bool)
    per_group = [torch.isfinite(torch.stack(torch._foreach_norm(group, float("inf")))).all()
                 for group in groups.values()]
    return torch.stack([f.to(per_group[0].device) for f in per_group]).all()


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state_dict()["state"].values() for t in state.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def message(what: str, value, at: int, steps_done: int, checkpoints: list,
            learning_rate: float) -> str:
    # checkpoints: the run's Checkpoints. The one of the last completed step holds the weights
    # that led to this value, so the last good one is older.
    led_here = [c.path for c in checkpoints if c.step == steps_done]
    good = [c.path for c in checkpoints if c.step < steps_done]
    return (f"{what} became {value} at step {at}: training diverged. Likely cause: learning_rate "
            f"{learning_rate:g} too high, or fp16 overflow (try mixed_precision=bf16 on A100/H100, or no). "
            "Nothing from this step was saved"
            + (f"; {led_here[0].name} holds the weights that led here" if led_here else "")
            + (f". The last good checkpoint is {good[-1]} (sample or export it with its step)" if good else
               ". No earlier checkpoint is good")
            + ". Start a new run_name with a lower learning_rate.")
