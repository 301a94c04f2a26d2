"""The one kind of progress bar dbnb shows, for every step that takes long.

A plain-text bar on stdout, in a terminal and in a notebook alike: tqdm's notebook bar is a
widget whose state a saved notebook does not keep (reopened, every bar reads 0 %), and it
does not render where widgets do not (Paperspace's own IDE). In a notebook it redraws at
most once a second so the saved output stays small."""
from __future__ import annotations

import sys

from tqdm import tqdm


def bar(iterable=None, **options):
    options.setdefault("file", sys.stdout)
    options.setdefault("mininterval", 1.0 if "ipykernel" in sys.modules else 0.1)
    return tqdm(iterable, **options)
