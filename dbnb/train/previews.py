"""Training previews: a few images of the sample prompts every `sample_every_steps`, rendered
with the denoiser being trained (in its family's pipeline, dbnb.family.base.Family.pipeline) and
saved under RUN/samples/step-NNNNNN/ with a grid.

Seeds are sample_seed, sample_seed+1, … for every prompt, so the previews of different steps
differ only by what was learnt (`dbnb.family.render.render`).
"""
from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from dbnb.core import precision
from dbnb.core.config import FEW_PREVIEWS
from dbnb.family.base import Family, Models, pipeline_clip_skip
from dbnb.family.render import PREVIEW_SAMPLER, make_grid, make_scheduler, render, with_legend


def preview_prompts(config) -> list[str]:
    """The prompts a preview renders: sample_prompts, or the instance prompt."""
    return list(config.sample_prompts) or [config.instance_prompt]


def warn_many_previews(config, steps: int) -> None:
    """Before the first step: a warning when each preview of a `steps`-step run renders more than
    FEW_PREVIEWS images, naming the count and the settings that lower it."""
    prompts = len(preview_prompts(config))
    each = prompts * config.num_samples
    previews = steps // config.sample_every_steps if config.sample_every_steps else 0
    if previews and each > FEW_PREVIEWS:
        warnings.warn(f"previews: every sample_every_steps={config.sample_every_steps} steps renders {prompts} "
                      f"prompt(s) × num_samples={config.num_samples} = {each} images ({previews * each} in the "
                      f"run), each a full generation ({config.sample_steps} sampling steps) while training waits. "
                      f"1-2 per prompt show how the run goes: lower num_samples or the number of sample_prompts, "
                      f"or raise sample_every_steps.", stacklevel=3)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def preview_pipeline(family: Family, models: Models, denoiser) -> tuple[object, list]:
    """The pipeline previews render with: the training denoiser, and every other part on its
    device (cache_latents parks the autoencoder on the CPU, where a CUDA denoiser's latents
    cannot reach it); and (part, device it was on) of each part moved for it."""
    sampler = family.pipeline(models, denoiser)
    sampler.scheduler = make_scheduler(PREVIEW_SAMPLER, sampler.scheduler.config)
    moved = []
    for part in sampler.components.values():
        if isinstance(part, torch.nn.Module) and _device(part) != _device(denoiser):
            moved.append((part, _device(part)))
            part.to(_device(denoiser))
    sampler.set_progress_bar_config(disable=True)
    return sampler, moved


def render_prompts(pipe, decode, prompts: list[str], negative_prompt: str, num_per_prompt: int, seed: int,
                   guidance_scale: float, steps: int, resolution: int,
                   width: int = 0, clip_skip: int | None = None) -> list[tuple[str, int, Image.Image]]:
    """(prompt, seed, image) for each prompt × seed; seeds are seed, seed+1, ... One image at a
    time: a preview must not need more VRAM than training leaves free. `resolution` tall, `width`
    (0: resolution) wide."""
    return [(prompt, seed + k, render(pipe, decode, prompt, [seed + k], negative=negative_prompt, steps=steps,
                                      guidance=guidance_scale, resolution=resolution, width=width,
                                      clip_skip=clip_skip)[0])
            for prompt in prompts for k in range(num_per_prompt)]


def save_previews(results: list[tuple[str, int, Image.Image]], folder: Path, cols: int) -> Path:
    """PNG per image (p{prompt}-s{seed}.png) plus grid.png; returns the grid's path."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(dict.fromkeys(p for p, _, _ in results))
    for prompt, seed, image in results:
        image.save(folder / f"p{prompts.index(prompt)}-s{seed}.png")
    (folder / "prompts.txt").write_text("".join(f"p{i}: {p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    grid = make_grid([im for _, _, im in results], cols, [f"p{prompts.index(p)} s{s}" for p, s, _ in results])
    grid = with_legend(grid, [f"p{i}: {p}" for i, p in enumerate(prompts)] + ["s: the sample's seed"])
    grid.save(folder / "grid.png")
    return folder / "grid.png"


def write_previews(run, step: int, family: Family, models: Models, denoiser, config,
                   size: tuple[int, int] | None = None) -> Path:
    """The previews of `step` in run.samples_dir(step), rendered with `denoiser` (the one being
    trained) at `size` (width, height; None: resolution square); the parts moved for them go back after."""
    width, height = size or (config.resolution, config.resolution)
    sampler, parked = preview_pipeline(family, models, denoiser)
    was_training = denoiser.training
    denoiser.eval()
    try:
        with precision.autocast(_device(denoiser).type, config.mixed_precision):
            results = render_prompts(sampler, partial(family.decode_latents, models.autoencoder),
                                     preview_prompts(config), config.sample_negative_prompt, config.num_samples,
                                     config.sample_seed, config.sample_guidance_scale, config.sample_steps,
                                     height, width, pipeline_clip_skip(family, config.clip_skip))
    finally:
        denoiser.train(was_training)
        for part, device in parked:  # back where they were parked, to free the VRAM again
            part.to(device)
    return save_previews(results, run.samples_dir(step), cols=config.num_samples)
