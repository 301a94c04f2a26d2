"""How a setting is declared: `setting()` holds every fact about one; the sections and notebook steps it names.

The group modules (model, prep, train, tuning, classimages, evaluate) declare the settings with it;
`Config` (whole.py) composes the groups into the one config.
"""
from __future__ import annotations

from dataclasses import field

from dbnb.core.errors import DbnbError

# The seed's "汎用ネガ" (generic quality negative), used for class images and previews.
QUALITY_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                    "fewer digits, cropped, worst quality, low quality, normal quality, "
                    "jpeg artifacts, signature, watermark, blurry")

SECTIONS = ("Model", "Directories", "Dataset", "Prompts", "Class Images", "Intervals", "Learning Rate",
            "Image Processing", "Tuning", "Gradients", "Samples", "Test Prompts")

# Images one training preview may render (sample prompts × num_samples) before the run warns:
# each is a full generation while training waits (dbnb.train.previews.warn_many_previews).
FEW_PREVIEWS = 4

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")


class ConfigError(DbnbError, ValueError):
    """A setting is wrong. The message names each field and says how to fix it."""


# The notebook step that owns each section's settings: its parameters cell is the only one
# that writes them to the workspace; later notebooks read them (a field may name another).
STEPS = {"setup": "01_setup", "dataset": "02_dataset", "class_images": "03_regularization",
         "train": "04_train", "test": "05_test_prompts"}
SECTION_STEPS = {"Model": "setup", "Directories": "train", "Dataset": "dataset", "Prompts": "train",
                 "Class Images": "class_images", "Intervals": "train", "Learning Rate": "train",
                 "Image Processing": "train", "Tuning": "train", "Gradients": "train", "Samples": "train",
                 "Test Prompts": "test"}


def setting(default, section: str, label: str, help: str, choices: tuple = (), help_ja: str = "",
            demo_only: tuple = (), suggestions: tuple = (),
            step: str = "", minimum: float | None = None, above: float | None = None,
            maximum: float | None = None,
            learns: bool = True, memory_saving=None, report: str = "if changed"):
    """One setting and every fact about it.

    `label` is the webui extension's name; `help` (English) and `help_ja` (Japanese, for the
    seed's readers) are shown under the field in the form and in `dbnb config --list`; `step`
    is the notebook step that owns it (default: its section's). The value must be at least
    `minimum` / greater than `above`, and at most `maximum`. `learns`: it changes what the run learns
    (rates, schedule, optimizer, seed, data, prompts, what is trained), so a resumed run must keep
    it; False for what only changes memory, speed, what is saved or shown, prep and tests. A resume
    compares only the settings of the groups a run freezes (`Config.frozen`). `memory_saving`:
    the value (or values) that lowers VRAM, named after an out-of-memory stop when not set.
    `report`: in the training report "always", "if changed" from the preset, or "apart"
    (paths and prompts, which have their own headings). `demo_only`: choices the config accepts
    (the demo and the tests set them) that the form and the notebooks' parameters cells never offer.
    `suggestions`: values the form and the cells offer for a free-text setting, which takes any other too."""
    assert section in SECTIONS, section
    step = step or SECTION_STEPS[section]
    assert step in STEPS, step
    assert report in ("always", "if changed", "apart"), report
    assert set(demo_only) <= set(choices), demo_only
    return field(default=default, metadata=dict(section=section, label=label, help=help, help_ja=help_ja,
                                                 choices=choices, demo_only=demo_only, suggestions=suggestions,
                                                 step=step,
                                                 minimum=minimum, above=above, maximum=maximum,
                                                 learns=learns, memory_saving=memory_saving,
                                                 report=report))

