"""The notebooks' shared start: where dbnb comes from, and one owner per setting."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dbnb.faces import install, notebook

ROOT = Path(__file__).resolve().parents[1]


def test_this_checkout_is_installed_and_kept():
    # The README's command installs it editable: nothing to do, and pip is not called.
    called = []
    assert install.origin() == ("installed", ROOT / "dbnb")
    assert "is installed" in install.ensure(run=lambda *a, **k: called.append(a))
    assert not called


def test_a_checkout_or_a_wheel_is_installed_with_the_platform_torch_pinned(tmp_path, monkeypatch):
    commands = []

    def pip(command):
        commands.append(command)
        pins = Path(command[command.index("-c") + 1]).read_text()
        commands.append(pins)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(install, "_forget_source", lambda wheel: None)
    monkeypatch.setattr(install, "origin", lambda: ("checkout", ROOT))
    install.ensure(run=pip)
    assert commands[0][:4] == [sys.executable, "-m", "pip", "install"]
    assert commands[0][-2:] == ["-e", f"{ROOT}[{install.EXTRAS}]"]
    import torch
    assert f"torch=={torch.__version__.split('+')[0]}" in commands[1] or f"torch=={torch.__version__}" in commands[1]

    wheel = tmp_path / "dbnb-0.1.0-py3-none-any.whl"
    forgotten = []  # the real one would drop this test session's dbnb modules
    monkeypatch.setattr(install, "_forget_source", forgotten.append)
    monkeypatch.setattr(install, "origin", lambda: ("wheel", wheel))
    install.ensure(run=pip)
    assert commands[2][-1] == f"{wheel}[{install.EXTRAS}]" and forgotten == [wheel]


def test_a_failed_pip_names_the_ways_to_get_dbnb(monkeypatch):
    monkeypatch.setattr(install, "origin", lambda: ("checkout", ROOT))
    with pytest.raises(install.InstallError, match="MyDrive/dbnb") as e:
        install.ensure(run=lambda command: subprocess.CompletedProcess(command, 1))
    assert "exit code 1" in str(e.value)


def test_dbnb_imported_from_a_wheel_on_sys_path_is_seen_as_the_wheel(tmp_path):
    """The install cell puts a Drive wheel on sys.path; origin() must say "wheel" so that
    ensure() pip-installs it (a zip cannot serve the package data as files)."""
    wheel = tmp_path / "dbnb-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f in ("__init__.py", "core/__init__.py", "core/errors.py", "faces/__init__.py", "faces/install.py"):
            z.write(ROOT / "dbnb" / f, f"dbnb/{f}")
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            f"sys.path.insert(0, {str(wheel)!r}); import dbnb.faces.install as i; print(i.origin())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.strip() == repr(("wheel", wheel))


def test_a_notebook_writes_only_the_settings_it_owns(tmp_path, capsys):
    ws = tmp_path / "ws"
    with pytest.raises(notebook.NotebookError, match="run notebook 01_setup first"):
        notebook.open_step("train", str(ws), {})
    notebook.open_step("setup", str(ws), {"pretrained_model_name_or_path": "m", "workspace": str(ws)})
    for later in ("class_images", "train", "test"):  # before 02: the step to run, not an empty prompt / folder
        with pytest.raises(notebook.NotebookError, match="no training pictures yet: run notebook 02_dataset first"):
            notebook.open_step(later, str(ws), {"instance_prompt": "hnzk girl"})
    _, c = notebook.open_step("dataset", str(ws), {"instance_token": "hnzk", "class_token": "girl",
                                                    "resolution": 64, "dataset_source": ""})
    assert c.instance_data_dir == str(ws / "dataset") and c.dataset_source == str(ws / "upload")
    _, c = notebook.open_step("class_images", str(ws), {"with_prior_preservation": True, "class_prompt": "",
                                                         "num_class_images": 30})
    assert c.class_prompt == "girl" and c.class_data_dir == str(ws / "class_images")
    # 04's own defaults for what 02 / 03 decided are not taken.
    _, c = notebook.open_step("train", str(ws), {"with_prior_preservation": False, "class_prompt": "Unan",
                                                  "resolution": 512, "instance_prompt": "", "learning_rate": 2e-6})
    assert c.with_prior_preservation and c.class_prompt == "girl" and c.resolution == 64
    assert c.instance_prompt == "hnzk girl" and c.learning_rate == 2e-6
    said = capsys.readouterr().out
    assert "class_prompt is set by notebook 03_regularization" in said
    assert "with_prior_preservation: true" in (ws / "config.yaml").read_text()
