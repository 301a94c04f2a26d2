"""The train notebook in a real JupyterLab, in headless Chromium: the form cell renders its
widgets and an edit made in the browser reaches the config the next cells use.

Needs Debian's `chromium` + `chromium-driver` (jupyterlab and selenium come with the `test`
extra); `.ci/run` installs them and sets DBNB_BROWSER_TEST=required, which turns the skip
where they are missing into a failure."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the networking flags Chromium keeps dialling Google's hosts, which this closed
# network refuses, and start-up crawls.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,1800")
TOKEN = "dbnb-browser-test"
pytestmark = pytest.mark.slow  # a JupyterLab server and Chromium: ~50 s


def _missing() -> str | None:
    for module in ("jupyterlab", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module} (pip install -e '.[test]')"
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(tool):
            return f"{tool} (apt-get install chromium chromium-driver)"
    return None


MISSING = _missing()
if MISSING:
    if os.environ.get("DBNB_BROWSER_TEST") == "required":
        raise RuntimeError(f"browser test required but {MISSING} is missing")
    pytestmark = pytest.mark.skip(reason=f"browser test needs {MISSING}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_train_notebook(folder: Path, config, **parameters) -> tuple[Path, int, int]:
    """The train notebook with the workspace (holding `config` as notebook 01–03 leave it)
    and `parameters` set by a cell after the parameters cell, as papermill injects them.
    Returns the file and the indices of the form cell and the train cell."""
    import nbformat

    ws = folder / "ws"
    ws.mkdir(exist_ok=True)
    config.save(ws / "config.yaml")
    nb = nbformat.read(ROOT / "notebooks" / "04_train.ipynb", as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in {"workspace": str(ws), **parameters}.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    nbformat.write(nb, folder / "train.ipynb")
    form = next(i for i, c in enumerate(nb.cells) if "ConfigForm(" in c.source)
    train = next(i for i, c in enumerate(nb.cells) if "TrainingView(" in c.source)
    return folder / "train.ipynb", form, train


@pytest.fixture
def train_notebook(tmp_path):
    from dbnb.core.config import Config

    # as notebook 02 leaves it: 04 asks for 02 first where no dataset folder is set
    path, form, _ = write_train_notebook(tmp_path, Config(instance_data_dir=str(tmp_path / "ws" / "dataset")))
    return path, form


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on a free local port, its state kept in the test's folder."""
    port, home = free_port(), tmp_path / "jupyter"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}", "--expose-app-in-browser",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(30)
    log.close()


@pytest.fixture
def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(300)
    yield driver
    driver.quit()


def wait_for(driver, script: str, timeout: float, what: str):
    """Poll a JS expression until it is truthy; fail with a screenshot-worthy message otherwise."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


PANEL = "const p = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
KERNEL_IDLE = PANEL + """
    const k = p && p.sessionContext && p.sessionContext.session && p.sessionContext.session.kernel;
    return k && k.status === 'idle'"""
# Starts the cells and returns at once: waiting here for a long cell would outlast the
# WebDriver connection's own read timeout (120 s) on a loaded box; callers poll instead.
RUN_UP_TO = PANEL + """
    const [index, done] = [arguments[0], arguments[arguments.length - 1]];
    p.content.activeCellIndex = index;
    window.dbnbRunError = null;
    window.jupyterapp.commands.execute('notebook:run-all-above')
      .then(() => window.jupyterapp.commands.execute('notebook:run-cell'))
      .catch(e => { window.dbnbRunError = String(e); });
    setTimeout(() => done(null), 2000);"""
# Asks the kernel directly, as the next notebook cell would, and hands back what it printed.
IN_KERNEL = PANEL + """
    const [code, done] = [arguments[0], arguments[arguments.length - 1]];
    const future = p.sessionContext.session.kernel.requestExecute({code});
    let out = '';
    future.onIOPub = m => { if (m.header.msg_type === 'stream') out += m.content.text;
                            if (m.header.msg_type === 'error') out += m.content.ename + ': ' + m.content.evalue; };
    future.done.then(() => done(out), e => done(String(e)));"""


def test_train_notebook_form_renders_and_edits_reach_the_config(lab, chromium, train_notebook, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from dbnb.core.config import SECTIONS, describe

    path, form_cell = train_notebook
    chromium.get(f"{lab}/lab/tree/{path.name}?token={TOKEN}")
    try:
        wait_for(chromium, KERNEL_IDLE, 180, "JupyterLab to open the notebook and start its kernel")
        error = chromium.execute_async_script(RUN_UP_TO, form_cell)
        assert error is None, error
        wait_for(chromium, KERNEL_IDLE + " && document.querySelectorAll('.jp-OutputArea .widget-text').length",
                 240, "the form cell to finish and its widgets to render")
        assert not chromium.execute_script("return window.dbnbRunError")
        chromium.save_screenshot(str(tmp_path / "form.png"))

        page = chromium.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel").text
        shown = [s for s in SECTIONS if s in page]
        assert shown == [s for s in SECTIONS if any(r["section"] == s for r in describe())], page[:2000]
        assert "widget model not found" not in page.lower() and "error displaying widget" not in page.lower()

        # Open "Learning Rate" and type a new value into the field users know by that name.
        chromium.find_element(By.XPATH, "//*[contains(@class,'jupyter-widget-Collapse-header')]"
                                        "[normalize-space()='Learning Rate']").click()
        field = chromium.find_element(By.XPATH, "//div[contains(@class,'widget-text')]"
                                                "[.//label[normalize-space()='Learning Rate']]//input")
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys("2e-06", Keys.TAB)
        time.sleep(1)  # the widget syncs its value to the kernel on change
        # Its help is a line on screen under the field (a tooltip would not show in JupyterLab 4).
        help_line = chromium.find_element(By.XPATH, "//div[contains(@class,'dbnb-help')][code='learning_rate']")
        chromium.execute_script("arguments[0].scrollIntoView({block: 'center'})", help_line)
        assert help_line.is_displayed() and help_line.size["height"] >= 20, help_line.size
        assert "1e-6" in help_line.text and "学習率" in help_line.text, help_line.text
        chromium.save_screenshot(str(tmp_path / "form-edited.png"))
        printed = chromium.execute_async_script(IN_KERNEL, "print(form.config().learning_rate)")
        assert printed.strip() == "2e-06", printed
    except Exception:
        chromium.save_screenshot(str(tmp_path / "failure.png"))
        raise
    assert (tmp_path / "form.png").stat().st_size > 10_000


def test_train_notebook_shows_the_live_view_and_keeps_the_final_plot_and_preview(lab, chromium, tiny_dir, tmp_path):
    """The train cell run in the browser on the tiny model: while it runs the live view is the
    only output; when it ends the loss plot and the last preview are plain pictures, the
    preview at its own aspect ratio (it once showed 64x78 stretched to 65x232)."""
    from selenium.webdriver.common.by import By

    from dbnb.core.config import Config
    from dbnb.world.demo import write_dataset

    instance, _ = write_dataset(tmp_path / "data", n_instance=3)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    output_dir=str(tmp_path / "ws" / "runs"), resolution=64, instance_token="hnzk",
                    class_token="girl")
    path, _, train_cell = write_train_notebook(
        tmp_path, config, run_name="live", max_train_steps=4, sample_every_steps=2, save_every_steps=4,
        mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False, learning_rate=1e-4)
    chromium.get(f"{lab}/lab/tree/{path.name}?token={TOKEN}")
    try:
        wait_for(chromium, KERNEL_IDLE, 180, "JupyterLab to open the notebook and start its kernel")
        error = chromium.execute_async_script(RUN_UP_TO, train_cell)
        assert error is None, error
        pictures = wait_for(chromium, KERNEL_IDLE + """ && (() => {
            const cell = p.content.widgets[arguments[0]].node;
            const shown = [...cell.querySelectorAll('.jp-OutputArea-output > img')].filter(i => i.naturalWidth);
            return shown.length >= 2 && shown.map(i => [i.naturalWidth, i.naturalHeight, i.width, i.height]);
        })()""".replace("arguments[0]", str(train_cell)), 420, "the train cell to end with its plot and preview")
        assert not chromium.execute_script("return window.dbnbRunError")
        chromium.execute_script(PANEL + f"p.content.widgets[{train_cell}].node.scrollIntoView({{block: 'start'}})")
        chromium.save_screenshot(str(tmp_path / "live-view.png"))
        page = chromium.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel").text
        assert "Traceback" not in page and "error displaying widget" not in page.lower()
        plot, preview = pictures[0], pictures[-1]
        grid = tmp_path / "ws" / "runs" / "live" / "samples" / "step-000004" / "grid.png"
        from PIL import Image
        with Image.open(grid) as im:
            assert (preview[0], preview[1]) == im.size  # the last preview, as written
        assert abs(preview[2] / preview[3] - preview[0] / preview[1]) < 0.02, preview  # not stretched
        assert plot[0] > 300 and plot[2] / plot[3] > 1.2, plot  # the matplotlib loss plot
    except Exception:
        chromium.save_screenshot(str(tmp_path / "failure.png"))
        raise
