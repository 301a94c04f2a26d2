"""The notebook form: a view of the config, nothing more."""
import re

import ipywidgets as w
import pytest

from dbnb.core.config import FIELDS, Config, ConfigError, describe
from dbnb.faces.widgets import ConfigForm, TrainingView, loss_curve_png


def test_form_round_trips_the_config_and_shows_every_field():
    config = Config(instance_prompt="nanU Unan", learning_rate=1.08e-6, sample_prompts=("a", "b, c"),
                    mixed_precision="bf16", hflip=True, num_class_images=50, class_prompt="Unan",
                    class_data_dir="c", with_prior_preservation=True)
    form = ConfigForm(config)
    assert set(form.fields) == set(FIELDS)
    assert form.config() == config


def test_the_form_does_not_offer_the_demo_worlds_scorer_but_keeps_a_config_that_set_it():
    assert "world" not in ConfigForm(Config()).fields["score_with"].options
    form = ConfigForm(Config(score_with="world"))
    assert form.fields["score_with"].value == "world" and form.config().score_with == "world"


def test_the_base_model_field_offers_the_anime_bases_and_takes_any_other_source():
    from dbnb.core.config.model import BASE_MODELS

    form = ConfigForm(Config())
    field = form.fields["pretrained_model_name_or_path"]
    assert list(field.options) == list(BASE_MODELS) and "Laxhar/noobai-XL-Vpred-1.0" in field.options
    field.value = "/content/drive/MyDrive/ponyDiffusionV6XL.safetensors"  # a Civitai download on Drive
    assert form.config().pretrained_model_name_or_path == "/content/drive/MyDrive/ponyDiffusionV6XL.safetensors"


def test_editing_a_widget_changes_the_config_and_bad_values_are_named():
    form = ConfigForm(Config())
    form.fields["hflip"].value = True
    form.fields["learning_rate"].value = "2e-6"
    form.fields["sample_prompts"].value = "x\n\ny\n"
    config = form.config()
    assert config.hflip is True and config.learning_rate == 2e-6 and config.sample_prompts == ("x", "y")
    form.fields["resolution"].value = 500
    with pytest.raises(ConfigError, match="resolution"):
        form.config()
    assert "resolution" in form.status.value  # shown under the form as soon as it is typed


def test_labels_are_the_extension_names_with_help_shown_under_each_field_in_both_languages():
    form = ConfigForm(Config(), sections=("Image Processing",))
    flip = form.fields["hflip"]
    assert flip.description == "Apply Horizontal Flip"
    assert set(form.fields) == {"resolution", "center_crop", "hflip", "alpha_mask_loss", "background_color", "skip_bad_images",
                                "bucketing", "bucket_min_side", "bucket_max_side", "bucket_upscale_limit"}
    shown = [c.value for c in form.widget.children[0].children[0].children if isinstance(c, w.HTML)]
    assert len(shown) == 10  # one visible help line per field, not a tooltip
    flip_help = next(h for h in shown if "<code>hflip</code>" in h)
    assert "asymmetric" in flip_help and "左右" in flip_help


def test_every_setting_has_japanese_help():
    missing = [r["name"] for r in describe() if not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", r["help_ja"])]
    assert not missing, f"settings without Japanese help: {missing}"


def test_training_view_draws_the_curve_shows_previews_and_keeps_them_as_outputs(tmp_path, monkeypatch):
    from PIL import Image

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs: shown.extend(objs))
    Image.new("RGB", (64, 78), "red").save(tmp_path / "grid.png")
    view = TrainingView(Config(sample_every_steps=2, max_train_steps=3), every=2, redraw_s=0)
    assert view.preview.layout.display == "none" and view.curve.layout.display == "none"  # no broken images
    view({"step": 1, "loss": 0.5, "lr": 1e-6, "time": 0.5, "max_steps": 3})
    view({"step": 2, "loss": 0.4, "lr": 1e-6, "time": 1.0, "preview": str(tmp_path / "grid.png"), "max_steps": 3})
    assert view.wait_drawn()
    assert bytes(view.curve.value).startswith(b"\x89PNG") and view.curve.layout.display is None
    assert bytes(view.preview.value) == (tmp_path / "grid.png").read_bytes()
    assert view.preview.layout.height == "auto"  # its own aspect ratio, not the row's height
    assert view.rate == 2.0
    assert not shown
    view({"step": 3, "loss": 0.3, "lr": 1e-6, "time": 1.5, "max_steps": 3, "last": True})
    view.finish()
    # The end of the run leaves ordinary outputs: the loss plot, then the last preview.
    assert [type(o).__name__ for o in shown] == ["Image", "Image"]
    assert shown[1].data == (tmp_path / "grid.png").read_bytes()


def test_training_view_says_when_previews_are_off_and_prints_lines_where_widgets_do_not_render(capsys):
    view = TrainingView(Config(sample_every_steps=0, max_train_steps=20), plain=True)
    assert "previews are off" in view.caption.value
    for step in range(1, 5):
        view({"step": step, "loss": 0.1 * step, "lr": 2e-6, "time": step / 4, "max_steps": 20})
    assert capsys.readouterr().out.splitlines() == ["step 2/20  loss 0.2000  lr 2.00e-06  4.00 it/s",
                                                    "step 4/20  loss 0.4000  lr 2.00e-06  4.00 it/s"]


def test_loss_curve_is_a_matplotlib_figure_of_the_values():
    import io

    import numpy as np
    from PIL import Image

    def line_ends(losses):
        pixels = np.asarray(Image.open(io.BytesIO(loss_curve_png([1, 2, 3], losses))).convert("RGB")).astype(int)
        ys, xs = np.nonzero((abs(pixels - (0x1F, 0x5F, 0xC8)).sum(axis=2) < 60))  # the curve's colour
        return ys[xs == xs.min()].mean(), ys[xs == xs.max()].mean()

    left, right = line_ends([3.0, 2.0, 1.0])
    assert left < right - 50  # falling loss: the line starts high (small y) and ends low
    left, right = line_ends([1.0, 2.0, 3.0])
    assert left > right + 50


def test_the_loss_curve_is_drawn_off_the_training_thread_at_most_every_redraw_s(monkeypatch):
    """A step only appends its record: the training thread never waits for matplotlib, and a
    fast run is redrawn at most once per redraw_s, not per step."""
    import threading
    import time

    from dbnb.faces import widgets

    real, draws = widgets.loss_curve_png, []

    def slow_draw(steps, losses, **kwargs):  # the real drawing, as slow as a 3000-point curve is
        draws.append((threading.current_thread(), len(steps)))
        time.sleep(0.3)
        return real(steps, losses, **kwargs)
    monkeypatch.setattr(widgets, "loss_curve_png", slow_draw)
    view = TrainingView(Config(sample_every_steps=0, max_train_steps=200), plain=False, redraw_s=0.5)
    started = time.monotonic()
    for step in range(1, 201):
        view({"step": step, "loss": 1 / step, "lr": 1e-6, "time": step / 100, "max_steps": 200})
    took = time.monotonic() - started
    assert took < 0.3, f"200 steps waited {took:.2f} s for the plot"
    assert view.wait_drawn(timeout=10)
    assert draws and all(thread is not threading.main_thread() for thread, _ in draws)
    assert len(draws) <= 2 + (time.monotonic() - started) / 0.5  # throttled, not one per step
    assert draws[-1][1] == 200  # the last redraw shows every step
    view.close()
