"""ipywidgets faces of the config, for the notebooks. Nothing in the library imports this.

`ConfigForm` shows every setting of `dbnb.config.Config`, grouped in the extension's
sections with the names users know and the help as a tooltip; `.config()` reads the
current values back as a validated Config. Building the form never waits for input, so
"Run all" and papermill pass straight through it.
"""
from __future__ import annotations

import io
from pathlib import Path

import ipywidgets as w

from dbnb import fetch
from dbnb.config import SECTIONS, Config, describe, from_dict

LABEL_STYLE = {"description_width": "260px"}
LAYOUT = w.Layout(width="720px")


def _widget(row: dict, value) -> w.Widget:
    common = dict(description=row["label"], tooltip=f"{row['name']}: {row['help']}", style=LABEL_STYLE,
                  layout=LAYOUT)
    if row["choices"]:
        return w.Dropdown(options=list(row["choices"]), value=value, **common)
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
        self.widget = w.VBox([w.Accordion(children=[w.VBox([self.fields[r["name"]] for r in self.rows
                                                             if r["section"] == s]) for s in groups],
                                          titles=tuple(groups)), self.status])
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
        except ValueError as e:
            self.status.value = f"<pre style='color:#b00'>{e}</pre>"

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


class TrainingView:
    """Live loss curve and latest preview during `dbnb.train.train(config, on_step=view)`."""

    def __init__(self, every: int = 10):
        self.every, self.steps, self.losses = every, [], []
        self.curve = w.Image(format="png", layout=w.Layout(width="480px"))
        self.preview = w.Image(format="png", layout=w.Layout(max_width="480px"))
        self.caption = w.HTML()
        self.widget = w.VBox([w.HBox([self.curve, self.preview]), self.caption])

    def __call__(self, record: dict) -> None:
        self.steps.append(record["step"])
        self.losses.append(record["loss"])
        if record.get("preview"):
            self.preview.value = Path(record["preview"]).read_bytes()
            self.caption.value = f"preview at step {record['step']}: {record['preview']}"
        if len(self.steps) % self.every == 0 or record.get("last"):
            self.curve.value = loss_curve_png(self.steps, self.losses)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


def loss_curve_png(steps: list[int], losses: list[float], size=(480, 240)) -> bytes:
    """A plain loss-vs-step plot drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    pad = 30
    if len(steps) >= 2:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        x = lambda s: pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (size[0] - 2 * pad)  # noqa: E731
        y = lambda v: size[1] - pad - (v - lo) / span * (size[1] - 2 * pad)  # noqa: E731
        draw.line([(x(s), y(v)) for s, v in zip(steps, losses)], fill=(30, 90, 200), width=1)
        draw.text((2, 2), f"loss {hi:.3f}", fill="black")
        draw.text((2, size[1] - pad + 2), f"{lo:.3f}", fill="black")
        draw.text((size[0] - 90, size[1] - 14), f"step {steps[-1]}", fill="black")
    draw.rectangle([pad, pad, size[0] - pad, size[1] - pad], outline=(180, 180, 180))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- the dataset notebook: upload box and caption editor -------------------------------------

CAPTION_THUMB = 256


def upload_widget(dest: str | Path):
    """A FileUpload that saves what is dropped on it into `dest` (then run prep on `dest`)."""
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
    from dbnb.prep.captions import edit_tag_everywhere

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
    from PIL import Image

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
