"""`Config`: the step groups composed into the one config a workspace and a run use, with its views.

Each group (ModelSettings, PrepSettings, TrainSettings, TuningSettings, ClassImageSettings,
EvaluateSettings) is a frozen dataclass declaring its settings; `Config` inherits them all, so
`config.learning_rate`, `dataclasses.replace` and FIELDS read one flat config. A run freezes only
FROZEN_GROUPS, what shapes training (`Config.frozen`, compared on resume).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from dbnb.core.config.checks import type_problems, value_problems
from dbnb.core.config.classimages import ClassImageSettings
from dbnb.core.config.declare import SECTIONS, STEPS, ConfigError
from dbnb.core.config.evaluate import EvaluateSettings
from dbnb.core.config.model import ModelSettings
from dbnb.core.config.prep import PrepSettings
from dbnb.core.config.train import TrainSettings
from dbnb.core.config.tuning import TuningSettings

# The groups, in the order the settings of one section are listed (the Class Images section has the
# trainer's three, then the class-image maker's).
GROUPS = (ModelSettings, PrepSettings, TrainSettings, TuningSettings, ClassImageSettings, EvaluateSettings)
# What shapes training: a run's config.json records every setting, a resume compares only these.
FROZEN_GROUPS = (ModelSettings, TrainSettings, TuningSettings)


# The bases are listed last group first: a dataclass takes its bases' fields from the last base to
# the first, so dataclasses.fields(Config) runs in GROUPS order.
@dataclass(frozen=True)
class Config(EvaluateSettings, ClassImageSettings, TuningSettings, TrainSettings, PrepSettings, ModelSettings):
    """Every setting dbnb reads, with its default, help and the name users know.

    The CLI's `key=value`, the notebooks' parameters cell, the ipywidgets form and each run's
    `config.json` are views of it; nothing else holds a setting. Names follow diffusers'
    `train_dreambooth.py` where it has one; `label` is the name in the AUTOMATIC1111 Dreambooth
    extension (what the seed's users look for), `section` the extension's tab group."""

    def __post_init__(self):
        problems = [p for f in FIELDS.values() for p in type_problems(f, getattr(self, f.name), field_type(f))]
        if not problems:
            problems = value_problems(self, FIELDS.values())
        if problems:
            raise ConfigError("Invalid dbnb config:\n  - " + "\n  - ".join(problems))

    # --- facts derived from the settings --------------------------------------------------------
    @property
    def fine_tunes_text_encoder(self) -> bool:
        """The whole text encoder learns (train_text_encoder, which a LoRA run does not use)."""
        return self.train_text_encoder and not self.use_lora

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder learns: fine-tuned whole, or through LoRA adapters."""
        return self.lora_text_encoder_rank > 0 if self.use_lora else self.train_text_encoder

    @property
    def learning_rate_settings(self) -> tuple[str, ...]:
        """The names of the learning rates this run trains with: UNet first, then the text encoder's."""
        unet, text = (("lora_learning_rate", "lora_text_encoder_learning_rate") if self.use_lora
                      else ("learning_rate", "text_encoder_lr"))
        return (unet, text) if self.trains_text_encoder else (unet,)

    @property
    def text_encoder_2_rate_setting(self) -> str:
        """The setting of SDXL's second text encoder's rate (0: the first's), for LoRA or a whole fine-tune."""
        return "lora_text_encoder_2_learning_rate" if self.use_lora else "text_encoder_2_lr"

    # --- views -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {name: (list(v) if isinstance(v := getattr(self, name), tuple) else v) for name in FIELDS}

    def frozen(self) -> dict:
        """The settings a run freezes (FROZEN_GROUPS), as in to_dict: what a resume compares. Prep,
        class-image making and test settings are not among them: changing those never blocks a resume."""
        data = self.to_dict()
        return {name: data[name] for name in FROZEN}

    def replace(self, **changes) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
        return path


def group_of(name: str) -> type:
    """The group that declares a setting."""
    return next(g for g in GROUPS if name in g.__dataclass_fields__)


# Every setting, by section in SECTIONS order (the form, config.yaml, `dbnb config --list` and the
# README table list them so), each section's in GROUPS order, each group's as declared.
FIELDS = {f.name: f for f in sorted((f for g in GROUPS for f in dataclasses.fields(g)),
                                    key=lambda f: SECTIONS.index(f.metadata["section"]))}
FROZEN = tuple(name for name in FIELDS if group_of(name) in FROZEN_GROUPS)


def field_type(f: dataclasses.Field) -> type:
    """The setting's type (bool, int, float, str; tuple for a list of strings)."""
    hint = _hints()[f.name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@functools.cache
def _hints() -> dict:
    # get_type_hints re-evaluates every annotation; once is enough (the form validates per keystroke).
    return typing.get_type_hints(Config)


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from plain data (JSON / YAML). Unknown keys are an error, not ignored."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"Unknown setting(s) in {source}: {', '.join(hints)}. "
                          "`dbnb config --list` shows every setting.")
    return Config(**{k: normalize(field_type(FIELDS[k]), v) for k, v in data.items()})


def normalize(kind: type, value):
    """The few lossless readings JSON / YAML need; anything else is left for validation."""
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    if kind is tuple and isinstance(value, str):
        return (value,)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # PyYAML reads 1e-6 (no dot) as a string
            return float(value)
        except ValueError:
            return value
    return value


def owner(name: str) -> str:
    """The notebook step whose parameters cell sets this setting."""
    return FIELDS[name].metadata["step"]


def step_fields(step: str) -> list[str]:
    """The settings one notebook step owns, in order."""
    assert step in STEPS, step
    return [name for name in FIELDS if owner(name) == step]


def section_fields(section: str) -> list[str]:
    """The settings of one section, in order (for a notebook that handles one step)."""
    assert section in SECTIONS, section
    return [name for name, f in FIELDS.items() if f.metadata["section"] == section]


def describe() -> list[dict]:
    """One row per setting, in order: for forms, `#@param` cells and the README table."""
    return [dict(name=f.name, default=f.default, type=field_type(f).__name__, **f.metadata)
            for f in FIELDS.values()]
