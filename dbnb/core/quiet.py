"""Silence what the libraries print that tells a dbnb user nothing, and nothing else.

Each message is matched exactly, on the logger that prints it, so a real warning from the
same library still shows. Called by the faces (the notebooks' install cell, the CLI), not
by the library: a program that imports dbnb keeps its own logging as it set it.
"""
from __future__ import annotations

import logging
import re

NOISE = {
    # transformers 5 without torchvision (dbnb never needs it) falls back to the PIL image
    # processor and says so in red on every pipeline load.
    "transformers.utils.import_utils": re.compile(r"requires torchvision \(not installed\); falling back"),
    # diffusers warns about casting a model with fp32-only modules even when there are none.
    "diffusers.models.modeling_utils": re.compile(r"should be kept in float32: \[\]"),
    # bitsandbytes on a CPU with AVX-512 BF16 tries, at import, to fetch a 4-bit kernel dbnb never
    # uses (dbnb's 8-bit optimizers need a GPU), through `kernels`, which first says it skips its
    # publisher check offline; both print on every run.
    "bitsandbytes.backends.cpu.ops": re.compile(r"^Failed to load CPU gemm_4bit_forward from kernels-community"),
    "kernels._internals.hf_hub": re.compile(r"^Skipping publisher trust check for 'kernels-community/"),
    # CLIP's tokenizer on a caption past 77 tokens; dbnb cuts it and says so once (data.warn_cut).
    "transformers.tokenization_utils_base": re.compile(r"^Token indices sequence length is longer than the "
                                                       r"specified maximum sequence length"),
}


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def library_noise(progress_bars: bool = True) -> None:
    """Drop the NOISE messages and the per-component "Loading pipeline components / Loading
    weights / Writing model shards" bars (dbnb shows one bar for each step that takes long).
    `progress_bars=False` leaves the bars, and diffusers unimported, to a command that loads no weights."""
    for name, pattern in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_Drop(pattern))
    if not progress_bars:
        return
    from diffusers.utils import logging as diffusers_logging  # lazy: loads diffusers
    from transformers.utils import logging as transformers_logging  # lazy: loads transformers

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
