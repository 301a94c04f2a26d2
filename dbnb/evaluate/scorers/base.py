"""What `dbnb score` asks of a way of scoring (`score_with`): the small interface every scorer fits.

A scorer turns a run's test images (a `dbnb.evaluate.sample.SampleResult`) and the instance pictures into
one row of numbers per grid row (base model, then each checkpoint), and says which of its
columns the recommendation weighs and how the plot groups them. The scorers: CLIP / DINO
(`dbnb.evaluate.scorers.clip`), the tiny world's pixel analysis (`dbnb.evaluate.scorers.world`), CCIP + tag adherence
(`dbnb.evaluate.scorers.ccip`); `dbnb.evaluate.score` runs whichever `score_with` names, recommends and writes the files.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from PIL import Image

from dbnb.core.errors import DbnbError


class ScoreError(DbnbError, RuntimeError):
    """Scores cannot be computed; the message names the setting or file and what to do."""


class Weighed(NamedTuple):
    """The columns the recommendation weighs, and how its rule names them."""
    fidelity: str
    flexibility: str
    fidelity_name: str
    flexibility_name: str


class Series(NamedTuple):
    """One line of the plot: a column, its legend label, its colour."""
    column: str
    label: str
    colour: str


class Panel(NamedTuple):
    """One panel of the plot, with a y scale of its own: CLIP-T moves by hundredths, fidelity by tenths."""
    ylabel: str
    series: tuple[Series, ...]


class Scorer(Protocol):
    columns: tuple[str, ...]    # the table's columns: "checkpoint", "step", then the scores
    weighed: Weighed
    panels: tuple[Panel, ...]

    def table(self, samples, instance: list[Image.Image]) -> list[dict]:
        """One dict per row of `samples`, with `columns` as keys."""


def images_of(samples, row, kind: str) -> list[tuple[object, Image.Image]]:
    """(test prompt, RGB image) of every seed of every `kind` prompt ("fidelity", "flexibility",
    "class") in one grid row."""
    return [(p, Image.open(samples.image_path(row, p, s)).convert("RGB"))
            for p in samples.prompts if p.kind == kind for s in samples.seeds]


def row_scores(row, **scores) -> dict:
    """A table row: the grid row's checkpoint ("base" for the base model) and step, then the scores."""
    return dict(checkpoint="base" if row.step is None else row.name, step=row.step or 0, **scores)
