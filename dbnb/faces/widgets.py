"""ipywidgets faces of the config, for the notebooks. Nothing in the library imports this.

`ConfigForm` shows every setting of `dbnb.core.config.Config`, grouped in the extension's
sections with the names users know and each setting's help in English and Japanese as a
grey line under the field (tooltips do not show for most widgets in JupyterLab 4);
`.config()` reads the current values back as a validated Config. Building the form never
waits for input, so "Run all" and papermill pass straight through it.
"""
from __future__ import annotations

import html
import io
import threading
import time
from pathlib import Path

import IPython.display
import ipywidgets as w

from dbnb.core.config import SECTIONS, Config, ConfigError, describe, from_dict
from dbnb.core.platform import detect_platform
from dbnb.data import intake as fetch

LABEL_WIDTH = 260
LABEL_STYLE = {"description_width": f"{LABEL_WIDTH}px"}
LAYOUT = w.Layout(width="720px")
HELP_STYLE = f"color:#666;font-size:12px;line-height:1.35;margin:0 0 6px {LABEL_WIDTH + 8}px;max-width:452px"


def _widget(row: dict, value) -> w.Widget:
    common = dict(description=row["label"], tooltip=f"{row['name']}: {row['help']}", style=LABEL_STYLE,
                  layout=LAYOUT)
    if row["choices"]:
        options = [c for c in row["choices"] if c not in row["demo_only"] or c == value]  # a config that set one keeps it
        return w.Dropdown(options=options, value=value, **common)
    if row["suggestions"]:
        return w.Combobox(value=value, options=list(row["suggestions"]), ensure_option=False, **common)
    if row["type"] == "bool":
        return w.Checkbox(value=value, indent=False, **common)
    if row["type"] == "int":
        return w.IntText(value=value, **common)
    if row["type"] == "float":
        # Text, not FloatText: FloatText rounds 1e-6 in some front-ends.
        return w.Text(value=repr(value), **common)
    if row["type"] == "tuple":
        return w.Textarea(value="\n".join(value), placeholder="one per line", **common)
    return w.Text(value=value, **common)


def help_html(row: dict) -> str:
    """The grey help line under a field: the setting's name, English, then Japanese."""
    ja = f"<br>{html.escape(row['help_ja'])}" if row.get("help_ja") else ""
    return (f"<div class='dbnb-help' style='{HELP_STYLE}'><code>{row['name']}</code> "
            f"{html.escape(row['help'])}{ja}</div>")


def _read(row: dict, widget: w.Widget):
    if row["type"] == "tuple":
        return [line.strip() for line in widget.value.splitlines() if line.strip()]
    if row["type"] == "float":
        try:
            return float(widget.value)
        except ValueError:
            return widget.value  # left for Config's validation to name
    return widget.value


class ConfigForm:
    """The form for a config (or for some sections of it)."""

    def __init__(self, config: Config | None = None, sections: tuple[str, ...] = SECTIONS):
        self.base = config or Config()
        values = self.base.to_dict()
        self.rows = [r for r in describe() if r["section"] in sections]
        self.fields = {r["name"]: _widget(r, values[r["name"]]) for r in self.rows}
        self.status = w.HTML()
        groups = [s for s in sections if any(r["section"] == s for r in self.rows)]
        boxes = [w.VBox([item for r in self.rows if r["section"] == s
                         for item in (self.fields[r["name"]], w.HTML(help_html(r)))]) for s in groups]
        self.widget = w.VBox([w.Accordion(children=boxes, titles=tuple(groups)), self.status])
        for widget in self.fields.values():
            widget.observe(self._validate, names="value")

    def config(self) -> Config:
        """The settings as they are in the form now (raises ConfigError naming what is wrong)."""
        changed = {r["name"]: _read(r, self.fields[r["name"]]) for r in self.rows}
        return from_dict({**self.base.to_dict(), **changed}, source="the form")

    def _validate(self, _change=None) -> None:
        try:
            self.config()
            self.status.value = ""
        except ConfigError as e:
            self.status.value = f"<pre style='color:#b00'>{html.escape(str(e))}</pre>"

    def _ipython_display_(self):
        IPython.display.display(self.widget)


# The loss curve is redrawn at most this often, on a thread of its own: a redraw takes about
# 0.24 s at 3000 points (issue 29), a fifth of a short step if the training thread waited for it.
REDRAW_S = 5.0


class TrainingView:
    """Live loss curve and latest preview during `dbnb.train.loop.train(config, on_step=view)`.

    Widgets only while training runs; `finish()` after it displays the final loss plot and
    the last preview as ordinary outputs, which a saved notebook keeps (after the progress
    bar's last line, so they end the cell's output). With `plain` (default on
    Paperspace, whose own IDE does not render widgets) a text line every tenth of the run says
    the same. The curve is drawn off the training thread, at most every `redraw_s` seconds:
    a step only appends its record."""

    def __init__(self, config: Config, every: int = 10, plain: bool | None = None, redraw_s: float = REDRAW_S):
        self.config, self.every, self.redraw_s = config, every, redraw_s
        self.plain = detect_platform() == "paperspace" if plain is None else plain
        self.steps, self.losses, self.times, self.lr = [], [], [], 0.0
        self.last_preview: Path | None = None
        hidden = dict(display="none")
        self.curve = w.Image(format="png", layout=w.Layout(width="480px", **hidden))
        # Its own aspect ratio: no fixed height, not stretched to the curve's height by the row.
        self.preview = w.Image(format="png", layout=w.Layout(max_width="480px", height="auto",
                                                            object_fit="contain", **hidden))
        off = ("previews are off (sample_every_steps = 0): the test grids of notebook 05 show the checkpoints. "
               "/ プレビューはオフです。")
        self.caption = w.HTML("" if config.sample_every_steps else off)
        self.widget = w.VBox([w.HBox([self.curve, self.preview], layout=w.Layout(align_items="flex-start")),
                              self.caption])
        self._lock = threading.Lock()  # the records, appended by training and copied by the drawer
        self._new = threading.Condition(self._lock)
        self._pending, self._drawn_upto, self._closed = 0, 0, False
        self._drawer: threading.Thread | None = None

    def __call__(self, record: dict) -> None:
        with self._new:
            self.times.append(record["time"])
            self.steps.append(record["step"])
            self.losses.append(record["loss"])
            self.lr = record["lr"]
            self._pending = len(self.steps)
            self._new.notify()
        if self._drawer is None:
            self._drawer = threading.Thread(target=self._draw_loop, name="dbnb-loss-curve", daemon=True)
            self._drawer.start()
        if record.get("preview"):
            self.last_preview = Path(record["preview"])
            self.preview.value = self.last_preview.read_bytes()
            self.preview.layout.display = None
            self.caption.value = f"preview at step {record['step']}"
        total = record.get("max_steps") or self.config.max_train_steps
        if self.plain and (record["step"] % max(1, total // 10) == 0 or record.get("last")):
            print(f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {self.lr:.2e}  "
                  f"{self.rate:.2f} it/s", flush=True)

    def _draw_loop(self) -> None:
        while True:
            with self._new:
                self._new.wait_for(lambda: self._closed or self._pending > self._drawn_upto)
                if self._closed:
                    return
            self._draw()
            with self._new:  # then rest, so the next redraw is redraw_s later (or at close)
                self._new.wait_for(lambda: self._closed, timeout=self.redraw_s)

    def _draw(self) -> None:
        with self._lock:
            steps, losses, upto = list(self.steps), list(self.losses), len(self.steps)
            title = f"lr {self.lr:.2e} · {self.rate:.2f} it/s"
        self.curve.value = loss_curve_png(steps, losses, title=title)
        self.curve.layout.display = None
        with self._lock:
            self._drawn_upto = max(self._drawn_upto, upto)

    def wait_drawn(self, timeout: float = 30.0) -> bool:
        """Wait until the curve shows every record received so far (True), or `timeout` passed."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if self._drawn_upto >= len(self.steps):
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop the drawing thread (waits for a redraw under way)."""
        with self._new:
            self._closed = True
            self._new.notify_all()
        if self._drawer is not None:
            self._drawer.join()

    @property
    def rate(self) -> float:
        """Steps per second over the last `every` steps (previews and saves included)."""
        k = min(len(self.steps), self.every + 1)
        span = self.times[-1] - self.times[-k] if k > 1 else 0.0
        return (self.steps[-1] - self.steps[-k]) / span if span > 0 else 0.0

    def loss_png(self) -> bytes:
        with self._lock:
            steps, losses = list(self.steps), list(self.losses)
            title = f"lr {self.lr:.2e} · {self.rate:.2f} it/s"
        return loss_curve_png(steps, losses, title=title)

    def finish(self) -> None:
        """The final loss plot and last preview as plain outputs (kept by a saved notebook)."""
        self.close()
        self.widget.layout.display = "none"
        IPython.display.display(IPython.display.Image(data=self.loss_png(), format="png"))
        if self.last_preview is not None:
            IPython.display.display(IPython.display.Image(filename=str(self.last_preview)))

    def _ipython_display_(self):
        IPython.display.display(self.widget)


def loss_curve_png(steps: list[int], losses: list[float], title: str = "", size=(4.8, 2.6)) -> bytes:
    """Loss against step, drawn with matplotlib (no pyplot: nothing global, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: loads matplotlib
    from matplotlib.figure import Figure  # lazy: loads matplotlib

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#1f5fc8", linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title or "training loss", fontsize=10)
    axes.grid(alpha=0.3)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


# --- the dataset notebook: upload box and caption editor -------------------------------------

CAPTION_THUMB = 256


def upload_widget(dest: str | Path):
    """A FileUpload that saves what is dropped on it into `dest` (then run prep on `dest`)."""
    Path(dest).mkdir(parents=True, exist_ok=True)  # an empty box then reads as "no pictures", not "no folder"
    upload = w.FileUpload(accept="image/*,.zip", multiple=True, description="Pictures / .zip")
    status = w.HTML()

    def on_change(change):
        placed, problems = fetch.save_uploads(change["new"], Path(dest))
        status.value = f"{len(placed)} picture(s) saved to {dest}" + "".join(f"<br>⚠ {p}" for p in problems)

    upload.observe(on_change, names="value")
    return w.VBox([upload, status])


def caption_editor(folder: str | Path, suffixes: tuple[str, ...] = (".png",)):
    """Each prepared picture beside its caption (tags, comma-separated), with a Save button per
    picture; above them, one tag removed from / added to every caption at once."""
    rows = []
    for image in sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes
                        and p.name != "contact_sheet.png"):
        rows.append(_editor_row(image))
    if not rows:
        return w.HTML(f"No pictures in {folder}: run prep first.")
    return w.VBox([_bulk_row(Path(folder), rows, suffixes), *rows])


def _bulk_row(folder: Path, rows, suffixes):
    from dbnb.prep.captions import edit_tag_everywhere  # lazy: loads torch, PIL, numpy

    tag = w.Text(placeholder="tag, e.g. white background", layout=w.Layout(width="300px"))
    remove, add, status = w.Button(description="Remove everywhere"), w.Button(description="Add to all"), w.Label()

    def apply(adding):
        n = edit_tag_everywhere(folder, tag.value, adding, suffixes)
        for row in rows:  # show the new captions
            txt = folder / Path(row.children[1].children[0].value).with_suffix(".txt")
            row.children[1].children[1].value = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        status.value = f"{'added to' if adding else 'removed from'} {n} caption(s)"

    remove.on_click(lambda _: apply(False))
    add.on_click(lambda _: apply(True))
    return w.HBox([tag, remove, add, status])


def _editor_row(image: Path):
    from PIL import Image  # lazy: loads PIL

    txt = image.with_suffix(".txt")
    buf = io.BytesIO()
    with Image.open(image) as im:  # keep_alpha pictures shown on white, not on black
        canvas = Image.new("RGBA", im.size, "white")
        Image.alpha_composite(canvas, im.convert("RGBA")).convert("RGB").resize(
            (CAPTION_THUMB, CAPTION_THUMB)).save(buf, "PNG")
    text = w.Textarea(value=txt.read_text(encoding="utf-8").strip() if txt.is_file() else "",
                      layout=w.Layout(width="420px", height="120px"))
    save, status = w.Button(description="Save"), w.Label()

    def on_save(_):
        txt.write_text(" ".join(text.value.split()) + "\n", encoding="utf-8")
        status.value = f"saved {txt.name}"

    save.on_click(on_save)
    return w.HBox([w.Image(value=buf.getvalue(), format="png"), w.VBox([w.Label(image.name), text, save, status])])
