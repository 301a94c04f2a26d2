"""What the five notebooks share: the start of every notebook, the workspace each step reads
and writes, and showing results so that a saved notebook keeps them.

A face, like `widgets.py` and `cli.py`: the library never imports it. Importing it needs
no torch (the install cell imports it before dbnb's dependencies may exist).

- `start()` (the install cell): dbnb installed or kept, dbnb's own errors shown as a
  short red message instead of a traceback, the library's meaningless warnings silenced.
- `open_step(step, workspace, globals())`: the workspace's `config.yaml` with the settings
  this notebook owns taken from its parameters cell — never another notebook's.
- `show_markdown(path)`: a report with its pictures embedded, so they show from anywhere.
"""
from __future__ import annotations

import base64
import importlib
import os
import re
from pathlib import Path

from dbnb.core.config import FAMILY_DEFAULTS, FIELDS, FULL_FINE_TUNE_GIB, STEPS, Config, owner, read_config_file
from dbnb.core.errors import DbnbError
from dbnb.core.platform import WORKSPACE_VARIABLE
from dbnb.faces import install
from dbnb.faces.workspace import load_workspace
from dbnb.faces.workspace import workspace as find_workspace

# Where a step keeps what it makes, inside the workspace (the later notebooks look there).
# An empty parameter of that name means the same folder.
STEP_FOLDERS = {"setup": {"output_dir": "runs"}, "dataset": {"instance_data_dir": "dataset", "dataset_source": "upload"},
                "class_images": {"class_data_dir": "class_images"}}
# An empty prompt in a later notebook means "the words notebook 02 chose".
FROM_TOKENS = {"class_prompt": "{class_token}", "instance_prompt": "{instance_token} {class_token}"}


class NotebookError(DbnbError):
    """The notebooks were run out of order or the workspace is not where they expect it."""


def start() -> None:
    """The install cell's one call: dbnb installed (or kept), errors and output made human."""
    _show_dbnb_errors_briefly(DbnbError)
    print(install.ensure(), flush=True)
    # ensure() drops the modules it imported from a wheel on sys.path, so every later cell
    # imports the installed copy, whose DbnbError is another class: brief for both.
    _show_dbnb_errors_briefly(DbnbError, importlib.import_module("dbnb.core.errors").DbnbError)
    importlib.import_module("dbnb.core.quiet").library_noise()  # after the install: it needs diffusers


def _show_dbnb_errors_briefly(*classes: type) -> None:
    try:
        from IPython import get_ipython  # lazy: optional IPython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def brief(shell, etype, value, tb, tb_offset=None):
        # The message already names what was wrong and the fix; a traceback would bury it.
        # Shown as the cell's error output (IPython discards a custom handler's return value
        # while the cell still counts as failed, so "Run all" stops here).
        shell._showtraceback(etype, value, [f"\x1b[1;31mdbnb: {value}\x1b[0m"])

    shell.set_custom_exc(tuple(dict.fromkeys(classes)), brief)


def open_step(step: str, workspace: str = "", namespace: dict | None = None) -> tuple[Path, Config]:
    """The workspace folder and its config, after this step's parameters are written to it.

    Only the settings `step` owns are taken from `namespace` (the notebook's `globals()`);
    a setting another notebook owns is reported and left as that notebook decided."""
    assert step in STEPS, step
    ws = find_workspace(workspace)
    os.environ[WORKSPACE_VARIABLE] = str(ws)  # the library shows paths relative to it
    saved = ws / "config.yaml"
    if step != "setup" and not saved.is_file():
        raise NotebookError(f"the workspace {ws} has no config.yaml: run notebook {STEPS['setup']} first, with the "
                            f"same workspace setting (empty on both: Google Drive / Paperspace storage). "
                            f"ワークスペースに config.yaml がありません。先にノート {STEPS['setup']} を実行してください。")
    namespace = dict(namespace or {})
    values = {name: str(ws / folder) for name, folder in STEP_FOLDERS.get(step, {}).items()}
    values.update({k: v for k, v in namespace.items() if k in FIELDS and owner(k) == step
                   and not (k in values and v == "")})
    foreign = sorted(k for k in namespace if k in FIELDS and owner(k) != step and not k.startswith("_"))
    for name in foreign:
        print(f"note: {name} is set by notebook {STEPS[owner(name)]}; the workspace's value is used here. "
              f"/ {name} はノート {STEPS[owner(name)]} で設定します。")
    known = {**Config().to_dict(), **(read_config_file(saved) if saved.is_file() else {}), **values}
    if list(STEPS).index(step) > list(STEPS).index("dataset") and not known["instance_data_dir"]:
        # Said here, before the empty prompt and the empty folder each fail in their own words.
        raise NotebookError(f"the workspace {ws} has no training pictures yet: run notebook {STEPS['dataset']} "
                            f"first, with the same workspace setting. 学習画像がまだありません。先にノート "
                            f"{STEPS['dataset']} を実行してください。")
    family_defaults(values, known)
    for name, pattern in FROM_TOKENS.items():
        filled = pattern.format(**known).strip()
        if owner(name) == step and not known.get(name) and filled:
            values[name] = filled
            print(f"{name}: {filled!r} (from the tokens of notebook {STEPS['dataset']})")
    config = load_workspace(ws, values, step=step)
    return ws, config


def family_defaults(values: dict, known: dict) -> None:
    """This step's values with the base model family's own defaults (FAMILY_DEFAULTS) where its
    parameters cell leaves them to it, each said in one line: `resolution` 0, and `use_lora` off on
    a family whose whole fine-tune needs a bigger GPU than this one (or none: a CPU)."""
    if values.get("resolution") != 0 and values.get("use_lora") is not False:
        return
    from dbnb.core.hardware import cuda_summary  # lazy: torch, only once the install cell has run
    from dbnb.family.base import for_model

    family = for_model(known["pretrained_model_name_or_path"]).name
    own = {**FAMILY_DEFAULTS["sd1"], **FAMILY_DEFAULTS.get(family, {})}
    if values.get("resolution") == 0:
        values["resolution"] = own["resolution"]
        print(f"resolution: {own['resolution']}, the {family} base model's own size / ベースモデル本来の解像度")
    gpu, needed = cuda_summary(), FULL_FINE_TUNE_GIB.get(family, 0)
    if own.get("use_lora") and values.get("use_lora") is False and (gpu or {}).get("total_vram_gib", 0) < needed:
        values["use_lora"] = True
        print(f"use_lora: True. A whole {family} fine-tune needs a GPU of {needed:g} GiB or more, "
              f"{'this one has ' + format(gpu['total_vram_gib'], 'g') + ' GiB' if gpu else 'and there is none here'}: "
              f"LoRA is what fits. / {family} の全体学習には {needed:g} GiB 以上の GPU が必要なので LoRA で学習します。")


def show_markdown(path: str | Path) -> None:
    """Display a Markdown report with its PNG links embedded as pictures, so they show in the
    notebook (relative links would resolve next to the notebook, not the run folder) and
    stay in the saved notebook."""
    from IPython.display import Markdown, display  # lazy: loads IPython

    path = Path(path)
    text = path.read_text(encoding="utf-8")

    def embed(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        file = (path.parent / target)
        if file.suffix.lower() == ".png" and file.is_file():
            data = base64.b64encode(file.read_bytes()).decode()
            return f"{label}<br><img src='data:image/png;base64,{data}' style='max-width:100%'>"
        return f"{label} (`{target}` in {path.parent.name}/)"

    display(Markdown(re.sub(r"\[([^\]]*)\]\(([^)\s]+)\)", embed, text)))
