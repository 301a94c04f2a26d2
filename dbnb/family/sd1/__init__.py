"""Stable Diffusion 1.x: loading from a folder, the Hub or one file, the shipped config skeleton, the original single-file key layout and its writer, the VAE's precision rule."""
