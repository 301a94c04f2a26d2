"""LoRA / LoCon adapters on any family's denoiser and encoder, through peft (diffusers' and
transformers' own adapter support). Which modules get them is the family's
(`Family.adapter_targets`; SD 1.x's: kohya's module set, in its family's folder): the
denoiser's at lora_rank, its 3x3 convs at lora_conv_rank (LoCon), the encoder's at
lora_text_encoder_rank (when > 0).

Every adapter has the scale alpha / rank (kohya's and peft's meaning of alpha); LoCon convs keep
the linear layers' ratio. A checkpoint's `lora/` folder holds the adapters (peft's state-dict
layout), their EMA, and `adapters.json` (the shapes), so the adapters can be rebuilt on the base
model without the run's config.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dbnb.core.errors import DbnbError
from dbnb.family.base import AdapterTargets, Family, Part, Parts

ADAPTER = "dbnb"  # the peft adapter name on the denoiser / encoder
# A checkpoint's lora/ folder: these, and each part's adapters in <part name>.safetensors
# (SD 1.x: unet.safetensors, text_encoder.safetensors; dbnb.family.base.Part)
SPEC_FILE, EMA_ADAPTERS_FILE = "adapters.json", "ema.safetensors"


class LoraError(DbnbError, RuntimeError):
    """LoRA adapters cannot be built or loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class Spec:
    """The adapters' shapes: what a checkpoint needs to rebuild them on the base model."""
    rank: int
    alpha: float
    conv_rank: int = 0
    text_encoder_rank: int = 0
    dropout: float = 0.0

    @classmethod
    def from_config(cls, config) -> "Spec":
        return cls(config.lora_rank, float(config.lora_alpha or config.lora_rank), config.lora_conv_rank,
                   config.lora_text_encoder_rank, config.lora_dropout)

    @property
    def conv_alpha(self) -> float:
        return self.alpha * self.conv_rank / self.rank

    @property
    def text_encoder_alpha(self) -> float:
        return self.alpha * self.text_encoder_rank / self.rank

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> "Spec":
        try:
            return cls(**json.loads((folder / SPEC_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as e:
            raise LoraError(f"{folder / SPEC_FILE} cannot be read ({e}): this LoRA checkpoint is incomplete; "
                            "choose another step.") from None


# --- which modules get adapters ------------------------------------------------------------------

def modules_inside(root: torch.nn.Module, blocks: tuple[str, ...]):
    """(name, module) of every Linear / Conv2d inside a module of one of the `blocks` classes."""
    seen = set()
    for name, module in root.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child_name, child in module.named_modules():
            full = f"{name}.{child_name}" if child_name else name
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and full not in seen:
                seen.add(full)
                yield full, child


def is_3x3(module) -> bool:
    """A conv that LoCon adapts at lora_conv_rank (1x1 convs count as linear layers)."""
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def _exact(names: list[str]) -> str:
    # One regex matching exactly these module paths: peft's list form matches by suffix, which
    # would also catch a same-named module elsewhere.
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def denoiser_lora_config(targets: AdapterTargets, spec: Spec):
    from peft import LoraConfig

    pattern = {re.escape(n): spec.conv_rank for n in targets.denoiser_convs}
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=True,
                      target_modules=_exact(targets.denoiser + targets.denoiser_convs), rank_pattern=pattern,
                      alpha_pattern={k: spec.conv_alpha for k in pattern})


def encoder_lora_config(targets: AdapterTargets, spec: Spec):
    from peft import LoraConfig

    return LoraConfig(r=spec.text_encoder_rank, lora_alpha=spec.text_encoder_alpha, lora_dropout=spec.dropout,
                      init_lora_weights=True, target_modules=_exact(targets.encoder))


def add_adapters(denoiser, encoder, spec: Spec, family: Family, seed: int | None = None) -> None:
    """Freeze both models and put fresh adapters on the modules `family` names (fp32, whatever
    the models' dtype). The initial weights come from `seed` (peft draws them from the global RNG)."""
    from diffusers.training_utils import cast_training_params

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        denoiser.requires_grad_(False)
        encoder.requires_grad_(False)
        _add(denoiser, encoder, spec, family)
    cast_training_params([denoiser, encoder], torch.float32)


def _add(denoiser, encoder, spec: Spec, family: Family) -> None:
    from peft import inject_adapter_in_model

    targets = family.adapter_targets(denoiser, encoder, spec)
    denoiser.add_adapter(denoiser_lora_config(targets, spec), adapter_name=ADAPTER)
    if spec.text_encoder_rank:
        # peft itself, not transformers' add_adapter: that one refuses peft releases older than
        # its own pin even where they work (transformers 5.24 wants peft >= 0.22)
        inject_adapter_in_model(encoder_lora_config(targets, spec), encoder, adapter_name=ADAPTER)


def adapter_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(state-dict key, parameter) of a model's adapters, keys as in `adapter_state`."""
    return [(name.replace(f".{ADAPTER}.", "."), p) for name, p in model.named_parameters()
            if f".{ADAPTER}." in name]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's layout (`<module>.lora_A.weight`, `.lora_B.weight`); {} when none."""
    return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in adapter_parameters(model)}


def set_adapter_state(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load adapter weights, refusing any that do not fit or are missing."""
    params = dict(adapter_parameters(model))
    missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or extra:
        raise LoraError(f"{source}: its adapters do not fit this model ({len(missing)} missing, {len(extra)} "
                        f"unexpected, e.g. {sorted(missing or extra)[0]}): was the run trained from another base "
                        "model?")
    with torch.no_grad():
        for k, p in params.items():
            if p.shape != state[k].shape:
                raise LoraError(f"{source}: adapter {k} has shape {tuple(state[k].shape)}, this model needs "
                                f"{tuple(p.shape)}: was the run trained from another base model?")
            p.copy_(state[k])


def set_scale(model, scale: float) -> None:
    """Every adapter of the model at `scale` × alpha / rank (the webui's <lora:name:scale>)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER, scale)


# --- in a checkpoint's lora/ folder -------------------------------------------------------------

def adapters_file(folder: Path, part: Part) -> Path:
    return folder / f"{part.name}.safetensors"


def held_parts(folder: Path, parts: Parts) -> set[str]:
    """The names of the parts whose adapters `folder` holds, and "ema" when it holds their EMA."""
    return ({part.name for part in (parts.denoiser, parts.encoder) if adapters_file(folder, part).is_file()}
            | ({"ema"} if (folder / EMA_ADAPTERS_FILE).is_file() else set()))


def save(folder: Path, denoiser, encoder, spec: Spec, ema_state: dict | None, parts: Parts) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    spec.save(folder)
    save_file(adapter_state(denoiser), adapters_file(folder, parts.denoiser))
    if spec.text_encoder_rank:
        save_file(adapter_state(encoder), adapters_file(folder, parts.encoder))
    if ema_state is not None:
        save_file(ema_state, folder / EMA_ADAPTERS_FILE)


def _ema_keys(denoiser, encoder, parts: Parts) -> list[str]:
    """The EMA's keys in the order of `trainable(denoiser, encoder)`: "<part name>.<adapter key>"."""
    return [f"{part.name}.{k}" for part, model in ((parts.denoiser, denoiser), (parts.encoder, encoder))
            for k, _ in adapter_parameters(model)]


def ema_state(shadow: list[torch.Tensor], denoiser, encoder, parts: Parts) -> dict[str, torch.Tensor]:
    """The EMA's shadow of `trainable(denoiser, encoder)`, keyed "unet.<key>" / "text_encoder.<key>" (SD 1.x)."""
    return {k: t.detach().to("cpu", torch.float32, copy=True)
            for k, t in zip(_ema_keys(denoiser, encoder, parts), shadow)}


def read_ema_shadow(folder: Path, denoiser, encoder, parts: Parts) -> list[torch.Tensor]:
    """The saved EMA shadow, in the order of `trainable(denoiser, encoder)`."""
    from dbnb.core.weights import read_safetensors

    saved = read_safetensors(folder / EMA_ADAPTERS_FILE)
    keys = _ema_keys(denoiser, encoder, parts)
    if set(keys) != saved.keys():
        raise LoraError(f"{folder / EMA_ADAPTERS_FILE}: its EMA does not match this run's adapters; resume from "
                        "another checkpoint.")
    return [saved[k] for k in keys]


def trainable(denoiser, encoder) -> list[torch.nn.Parameter]:
    """The adapters' parameters in a fixed order (the optimizer's and the EMA's)."""
    return [p for model in (denoiser, encoder) for _, p in adapter_parameters(model)]


def read(folder: Path, parts: Parts, ema: bool = False) -> tuple[dict, dict]:
    """(denoiser, encoder) adapter state dicts of a checkpoint (their EMA when `ema`)."""
    from dbnb.core.weights import read_safetensors

    if ema:
        both = read_safetensors(folder / EMA_ADAPTERS_FILE)
        split = lambda part: {k[len(part) + 1:]: v for k, v in both.items() if k.startswith(part + ".")}  # noqa: E731
        return split(parts.denoiser.name), split(parts.encoder.name)
    encoder = adapters_file(folder, parts.encoder)
    return (read_safetensors(adapters_file(folder, parts.denoiser)),
            read_safetensors(encoder) if encoder.is_file() else {})


def load_into(folder: Path, denoiser, encoder, family: Family, ema: bool = False, scale: float = 1.0) -> None:
    """Put a checkpoint's adapters on `family`'s denoiser and encoder (adding them on first use)."""
    spec = Spec.read(folder)
    denoiser_sd, encoder_sd = read(folder, family.parts, ema)
    if not any(f".{ADAPTER}." in n for n, _ in denoiser.named_parameters()):
        with torch.random.fork_rng(devices=[]):
            _add(denoiser, encoder, spec, family)
    set_adapter_state(denoiser, denoiser_sd, folder)
    if spec.text_encoder_rank:
        set_adapter_state(encoder, encoder_sd, folder)
    for model in (denoiser, encoder):
        set_scale(model, scale)


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's plain state dict with its adapters merged into the weights (base + LoRA)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
