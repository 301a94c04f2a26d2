"""Config files and the command line: reading config.yaml / config.json, `key=value` overrides, presets applied in order."""
from __future__ import annotations

import json
import typing
from pathlib import Path

from dbnb.core.config.declare import ConfigError
from dbnb.core.config.presets import PRESETS
from dbnb.core.config.whole import FIELDS, Config, field_type, from_dict, normalize

# Keys a run folder adds to its config.json beside the settings (dbnb.run.checkpoints writes
# them). Reading a config file drops them, so a run's config.json can start another run.
RUN_KEYS = ("run_id", "dbnb_version")


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from the command line, the value read as YAML (so 1e-6, true, [a, b] work)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Override {text!r} is not key=value (e.g. learning_rate=1e-6).")
    if key not in FIELDS:
        from_dict({key: None}, source="the command line")  # raises with a suggestion
    kind = field_type(FIELDS[key])
    if kind is str:
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read {raw!r} ({e}).") from None
    return key, normalize(kind, value)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                preset: str | None = None) -> Config:
    """Defaults ← preset ← file ← `key=value` overrides, validated once at the end."""
    data: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        data.update(PRESETS[preset])
    if path:
        data.update(read_config_file(path))
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    return from_dict(data, source=str(path) if path else "config")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. `dbnb config --preset person > {path.name}` writes one.")
    text = path.read_text(encoding="utf-8")
    try:
        # JSON only for .json: any other name is read as YAML, which reads JSON too, so a file an
        # editor or a download renamed (my.yaml.txt, config.yml.yaml) still reads as it is.
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text) or {}
    except Exception as e:  # noqa: BLE001 — parser errors differ by format; the message says which file
        raise ConfigError(f"Cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of setting: value, not {type(data).__name__}.")
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def as_overrides(config: Config, names: typing.Iterable[str]) -> list[str]:
    """`key=value` strings that `load_config(..., overrides)` reads back to these values."""
    out = []
    for name in names:
        value = getattr(config, name)
        text = value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
        out.append(f"{name}={text}")
    return out
