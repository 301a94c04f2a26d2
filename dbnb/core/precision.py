"""Precision names → torch dtypes: the one place that reads them. Two vocabularies, each its own rule:

* a run's `mixed_precision` ("no" / "fp16" / "bf16", accelerate's names): what training's frozen
  parts compute in, and what sampling (test images, class images, previews) runs in;
* a written file's precision ("fp16" / "fp32" / "bf16", the webui's names): export and merge.

The VAE is in neither: it always runs in fp32 (dbnb.family.sd1.autoencoder says why). The per-step
checkpoint weights are fp16 whatever the run's precision (dbnb.run.checkpoints.WEIGHTS_DTYPE).
"""
from __future__ import annotations

import torch

MIXED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
FILE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def mixed_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype of a run's mixed precision; fp32 for "no" (and any name accelerate adds that
    dbnb does not use)."""
    return MIXED_DTYPES.get(mixed_precision, torch.float32)


def inference_dtype(mixed_precision: str, device: str | torch.device) -> torch.dtype:
    """The dtype a pipeline is loaded in to sample: the run's mixed precision on a GPU, fp32 on
    the CPU, where half precision is slow or unsupported."""
    return torch.float32 if torch.device(device).type == "cpu" else mixed_dtype(mixed_precision)


def autocast(device_type: str, mixed_precision: str):
    """torch.autocast in the run's mixed precision, off for "no": for what runs in the middle of
    training outside accelerate's own autocast (the previews)."""
    # Off or not, torch.autocast sets the dtype it is given as the autocast dtype: a half one
    # (fp16 for "no") keeps it one that autocast supports.
    return torch.autocast(device_type, enabled=mixed_precision != "no",
                          dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)
