"""Training: the loop, optimizers, memory settings, the disk plan, divergence guards, previews, reproducibility and the process around a run."""
