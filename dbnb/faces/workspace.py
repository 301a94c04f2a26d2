"""The notebooks' workspace: one folder that survives the session (Drive on Colab, /storage
on Paperspace) and its `config.yaml`, which each notebook reads and the step that owns a
setting writes."""
from __future__ import annotations

import os
from pathlib import Path

from dbnb.core.config import FIELDS, Config, from_dict, owner, read_config_file
from dbnb.core.platform import persistent_dir


def workspace(folder: str | os.PathLike[str] = "") -> Path:
    """The notebooks' shared folder: the given one, else persistent storage (Drive on Colab,
    /storage on Paperspace) so a new session finds the last one's work, else ./dbnb-work."""
    path = Path(folder).expanduser() if folder else (persistent_dir() or Path("dbnb-work").resolve())
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_workspace(folder: str | Path, namespace: dict | None = None, step: str | None = None) -> Config:
    """The notebooks' shared config, `<folder>/config.yaml`, updated with the variables of
    `namespace` that are settings (a notebook passes `globals()`, so its parameters cell's
    names are the settings' names) and saved back for the next notebook.

    With `step`, only the settings that step owns are taken from `namespace`: a later
    notebook never overwrites an earlier one's decision with its own default."""
    path = Path(folder) / "config.yaml"
    data = read_config_file(path) if path.is_file() else {}
    data.update({k: v for k, v in (namespace or {}).items() if k in FIELDS and (step is None or owner(k) == step)})
    config = from_dict(data, source=str(path))
    config.save(path)
    return config
