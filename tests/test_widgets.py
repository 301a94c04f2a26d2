"""The notebook form: a view of the config, nothing more."""
import pytest

from dbnb.config import FIELDS, Config, ConfigError
from dbnb.widgets import ConfigForm, TrainingView, loss_curve_png


def test_form_round_trips_the_config_and_shows_every_field():
    config = Config(instance_prompt="nanU Unan", learning_rate=1.08e-6, sample_prompts=("a", "b, c"),
                    mixed_precision="bf16", hflip=True, num_class_images=50, class_prompt="Unan",
                    class_data_dir="c", with_prior_preservation=True)
    form = ConfigForm(config)
    assert set(form.fields) == set(FIELDS)
    assert form.config() == config


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


def test_labels_are_the_extension_names_with_help_as_tooltip():
    form = ConfigForm(Config(), sections=("Image Processing",))
    flip = form.fields["hflip"]
    assert flip.description == "Apply Horizontal Flip" and "asymmetric" in flip.tooltip
    assert set(form.fields) == {"resolution", "center_crop", "hflip", "alpha_mask_loss", "background_color"}


def test_training_view_draws_the_curve_and_shows_previews(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "grid.png")
    view = TrainingView(every=2)
    view({"step": 1, "loss": 0.5})
    view({"step": 2, "loss": 0.4, "preview": str(tmp_path / "grid.png")})
    assert bytes(view.curve.value).startswith(b"\x89PNG")
    assert bytes(view.preview.value) == (tmp_path / "grid.png").read_bytes()
    assert loss_curve_png([1, 2, 3], [3.0, 2.0, 1.0]) != loss_curve_png([1, 2, 3], [1.0, 2.0, 3.0])
