"""The optimizer a run trains with, from `optimizer` and `use_8bit_adam`.

`wanted(config)` is what the settings ask for:

    optimizer=adamw      use_8bit_adam=true  → adamw8bit   (the webui's way, and the default pair)
    optimizer=adamw      use_8bit_adam=false → adamw
    optimizer=adamw8bit  use_8bit_adam=true  → adamw8bit   (=false beside it: refused by config)
    optimizer=lion       use_8bit_adam=true  → lion8bit    (bitsandbytes' Lion8bit)
    optimizer=lion       use_8bit_adam=false → lion        (bitsandbytes' Lion, else torch's own)
    optimizer=prodigy    either              → prodigy     (prodigyopt; no 8-bit form)

`build` makes it. One that cannot run here falls back to torch's AdamW with one warning line
naming what is missing and how to get it; the checkpoint records the optimizer actually
built (`name_of`), so a resume elsewhere that would build another one stops instead of
loading a state that does not fit.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from dbnb.core.config import FIELDS, Config

PRODIGY_INSTALL = "pip install prodigyopt (or dbnb[prodigy])"
BNB_INSTALL = "pip install bitsandbytes (or dbnb[bnb]) on a CUDA GPU"


def wanted(config: Config) -> str:
    """adamw, adamw8bit, lion, lion8bit or prodigy: the table above."""
    if config.optimizer == "adamw":
        return "adamw8bit" if config.use_8bit_adam else "adamw"
    if config.optimizer == "lion":
        return "lion8bit" if config.use_8bit_adam else "lion"
    return config.optimizer


def build(config: Config, unet, text_encoder, world: int, device: torch.device, bnb_check=None,
          encoders: tuple[str, ...] = ()):
    """The optimizer over the trainable weights of `unet` (and `text_encoder` when it learns).
    `bnb_check`: whether bitsandbytes runs here (default: `env.check_bitsandbytes` on `device`).
    `encoders`: the names of the text encoders in `text_encoder` when it holds several (the family's
    Part.members; SDXL's te1, te2): the second and later learn at the second encoder's rate."""
    make, kwargs, rates = _factory(config, device, bnb_check)
    scale = config.train_batch_size * config.gradient_accumulation_steps * world if config.scale_lr else 1
    groups = [{"params": trained(unet), "lr": rates[0] * scale}]
    if config.trains_text_encoder:
        parts = [text_encoder[name] for name in encoders] or [text_encoder]
        groups += [{"params": trained(part), "lr": (rates[1] if i == 0 else rates[2]) * scale}
                   for i, part in enumerate(parts)]
    if config.optimizer_in_backward:
        from dbnb.train.inbackward import OptimizerInBackward
        optimizer = OptimizerInBackward(groups, make, track_grad_norm=True, **kwargs)
    else:
        optimizer = make(groups, **kwargs)
    optimizer.dbnb_name = _name(make)
    return optimizer


def trained(module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _name(make) -> str:
    return getattr(make, "func", make).__name__


# The torch release whose AdamW(fused=True) takes CPU tensors. Fused on a CPU: 6.8 ms a step
# against 30.8 single-tensor (the tiny world's UNet + text encoder, 736 tensors, 2 cores).
FUSED_ADAMW_ON_CPU = "2.4"


def fused_adamw(device: torch.device) -> bool:
    from packaging.version import Version

    if device.type == "cuda":
        return True
    return device.type == "cpu" and Version(torch.__version__) >= Version(FUSED_ADAMW_ON_CPU)


def rates_of(config: Config, value=getattr) -> tuple[float, float, float]:
    """(UNet, text encoder, second text encoder) learning rates, each setting read by `value(config, name)`;
    the second text encoder's (SDXL's lora_text_encoder_2_learning_rate or text_encoder_2_lr) at 0 is the first's."""
    unet, text = (*(value(config, name) for name in config.learning_rate_settings), 0.0)[:2]
    second = value(config, config.text_encoder_2_rate_setting)
    return unet, text, second or text


def _factory(config: Config, device: torch.device, bnb_check):
    """(constructor, its keyword arguments, (UNet lr, text-encoder lr, second text-encoder lr))."""
    rates = rates_of(config)
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
                eps=config.adam_epsilon)
    torch_adamw = functools.partial(torch.optim.AdamW, fused=fused_adamw(device))
    kind = wanted(config)
    if kind == "adamw":
        return torch_adamw, adam, rates

    if kind == "prodigy":
        if importlib.util.find_spec("prodigyopt") is not None:
            from prodigyopt import Prodigy

            # The settings Prodigy's authors give for diffusion models: bias correction with Adam's
            # betas, and no step-size growth during warmup (the LR schedule's warmup still applies).
            return Prodigy, dict(adam, use_bias_correction=True, safeguard_warmup=True), rates
        # Prodigy's rates (~1.0) are multipliers; as AdamW step sizes they would wreck the model.
        defaults = rates_of(config, lambda _, name: FIELDS[name].default)
        said = ", ".join(f"{n}={r:g}" for n, r in zip(config.learning_rate_settings, defaults))
        warnings.warn(f"optimizer=prodigy: prodigyopt is not installed ({PRODIGY_INSTALL}); training with "
                      f"torch.optim.AdamW at {said} (the defaults: Prodigy's multipliers are far too large "
                      "as AdamW learning rates).", stacklevel=3)
        return torch_adamw, adam, defaults

    check = bnb_check if bnb_check is not None else _check_bitsandbytes(device)
    if check.ok:
        import bitsandbytes as bnb
        if kind == "adamw8bit":
            return bnb.optim.AdamW8bit, adam, rates
        # Lion keeps its paper's betas (0.9, 0.99); Adam's beta2 of 0.999 is not Lion's.
        lion = dict(weight_decay=config.adam_weight_decay)
        return (bnb.optim.Lion8bit if kind == "lion8bit" else bnb.optim.Lion), lion, rates
    if kind == "lion" and hasattr(torch.optim, "Lion"):
        return torch.optim.Lion, dict(weight_decay=config.adam_weight_decay), rates
    setting = "use_8bit_adam" if kind == "adamw8bit" else f"optimizer=lion (use_8bit_adam={config.use_8bit_adam})"
    torch_note = "" if kind == "adamw8bit" else " and this torch has no Lion"
    hint = f" ({BNB_INSTALL})" if check.detail == "not installed" else ""
    warnings.warn(f"{setting}: bitsandbytes {check.detail}{torch_note}{hint}; using torch.optim.AdamW "
                  "(more VRAM).", stacklevel=3)
    return torch_adamw, adam, rates


def _check_bitsandbytes(device: torch.device):
    from dbnb.core.hardware import check_bitsandbytes
    return check_bitsandbytes(device.type)


# What each optimizer keeps per trained weight once it has stepped: its part of a resume state,
# known before the first step so the disk plan can size a whole run (dbnb.train.diskplan). The 8-bit
# ones quantise in blocks of 256 with one fp32 scale per block and per state, and keep tensors
# under 4096 values in fp32 (bitsandbytes' min_8bit_size).
STATE_BYTES = {"AdamW": (8, 8, 0), "AdamW8bit": (8, 2, 2), "Lion": (4, 4, 0), "Lion8bit": (4, 1, 1),
               "Prodigy": (16, 16, 0)}   # name: (bytes per value, bytes per value 8-bit, 8-bit states)
MIN_8BIT_SIZE, BLOCK = 4096, 256


def state_bytes(name: str, params) -> int:
    """Bytes of the state the optimizer `name` (as `name_of` says it) keeps for `params`."""
    small, large, quantised = STATE_BYTES.get(name, STATE_BYTES["AdamW"])
    total = 0
    for p in params:
        n = p.numel()
        if quantised and n >= MIN_8BIT_SIZE:
            total += n * large + quantised * 4 * (-(-n // BLOCK) + BLOCK)  # + the scales and the code map
        else:
            total += n * small
    return total
