"""Pictures from a pipeline and pictures of pictures: seeded rendering, the sampler set-up, grids.

The low layer under training previews (`dbnb.train.previews`), test-prompt grids (`dbnb.evaluate.sample`),
class images (`dbnb.prep.classimages`), the prep contact sheet and the score plots' font: it knows
PIL, torch and diffusers' schedulers, nothing of runs or settings.

Every image has its own CPU generator seeded with its own seed, so the same prompt, seed and
weights give the same picture at any step, batch size or device — which is what makes previews
of different steps comparable and class image k the same on every rerun — and rendering never
touches the global RNG that training might use.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont

# sampler name -> (diffusers scheduler, the name A1111 shows). DPM++ 2M is DPMSolverMultistep's
# default (dpmsolver++, order 2).
SAMPLERS = {"ddim": ("DDIMScheduler", "DDIM"),
            "euler_a": ("EulerAncestralDiscreteScheduler", "Euler a"),
            "dpmpp_2m": ("DPMSolverMultistepScheduler", "DPM++ 2M")}
PREVIEW_SAMPLER = "dpmpp_2m"  # previews and test prompts: good at ~20-30 steps
# On a CPU a batch is bounded by time, not memory: 4 images of 512 px, more of smaller ones, where
# each call's fixed cost is most of the work (the 64-px world model: 3.5 img/s at batch 4, 7.9 at
# 16, 2 cores), up to CPU_MAX_BATCH.
CPU_PIXELS_PER_BATCH = 4 * 512 * 512
CPU_MAX_BATCH = 16
# A zero-terminal-SNR base over-exposes at the usual guidance unless the guided prediction is rescaled
# toward the conditional one's spread (Lin et al. 2023, section 3.4, phi = 0.7: what ComfyUI's RescaleCFG
# node is set to for NoobAI-XL v-pred); other bases render as before, without.
ZERO_SNR_GUIDANCE_RESCALE = 0.7


def guidance_rescale(schedule) -> float:
    """diffusers' guidance_rescale for a base sampling as `schedule` says (a scheduler config, or a run's
    recorded sampling): ZERO_SNR_GUIDANCE_RESCALE for a zero-terminal-SNR one, else none."""
    return ZERO_SNR_GUIDANCE_RESCALE if schedule.get("rescale_betas_zero_snr") else 0.0


def cpu_batch_size(resolution: int) -> int:
    """Images per pipeline call on a CPU (test images, class images) at `resolution`."""
    return max(1, min(CPU_MAX_BATCH, CPU_PIXELS_PER_BATCH // resolution ** 2))


def make_scheduler(name: str, scheduler_config):
    """The diffusers scheduler of sampler `name` (a SAMPLERS key) from a pipeline's scheduler config,
    sampling as it says (v-prediction, zero-terminal SNR). A zero-terminal-SNR schedule steps from the
    last timestep ("trailing"): SDXL's "leading" spacing, which such a base's folder may keep (NoobAI-XL
    v-pred), never starts from the pure noise such a base was trained to start from (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed"; diffusers' docs ask for "trailing" with it)."""
    import diffusers

    trailing = {"timestep_spacing": "trailing"} if scheduler_config.get("rescale_betas_zero_snr") else {}
    return getattr(diffusers, SAMPLERS[name][0]).from_config(scheduler_config, **trailing)


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: CPU, so a seed gives the same noise on every device."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def render(pipe, decode: Callable[[torch.Tensor], torch.Tensor], prompt: str, seeds: list[int], *,
           negative: str = "", steps: int, guidance: float, resolution: int, width: int = 0,
           clip_skip: int | None = None) -> list[Image.Image]:
    """One image per seed in one batch, decoded by `decode` (the family's decode_latents of the
    pipeline's autoencoder: its precision rule, not the pipeline's); `resolution` tall and `width`
    (0: resolution) wide; `clip_skip` as diffusers' pipelines count it (dbnb.family.base.pipeline_clip_skip).
    A zero-terminal-SNR base's guidance is rescaled (ZERO_SNR_GUIDANCE_RESCALE)."""
    latents = pipe(prompt, negative_prompt=negative or None, num_images_per_prompt=len(seeds),
                   num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=width or resolution,
                   generator=generators(seeds), output_type="latent", clip_skip=clip_skip,
                   guidance_rescale=guidance_rescale(pipe.scheduler.config)).images
    return pipe.image_processor.postprocess(decode(latents), output_type="pil")


# --- grids ------------------------------------------------------------------------------------------

def font(size: int):
    """Pillow's scalable default font at `size` px; the small bitmap one where that is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def make_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None, *, size=None,
              background="white", labels_below: bool = False, pad: int = 0) -> Image.Image:
    """Images in rows of `cols`, in cells of `size` (the first image's by default), each resized
    to its cell less `pad` on every side; optionally a caption strip over (or under) each."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    w, h = size or images[0].size
    strip = 14 if labels else 0
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), background)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        top = y if labels_below else y + strip
        grid.paste(image.convert("RGB").resize((w - 2 * pad, h - 2 * pad)), (x + pad, top + pad))
        if labels:
            draw.text((x + 3, y + h) if labels_below else (x + 2, y + 1), labels[i][: max(4, w // 6)],
                      fill=(20, 20, 20) if labels_below else "black")
    return grid


def with_legend(image: Image.Image, lines: list[str], min_width: int = 320) -> Image.Image:
    """`image` with `lines` written under it: what a grid's short labels (p0, s1234) stand for,
    so the picture explains itself wherever it is opened. Widened to `min_width` for tiny grids."""
    face = font(11)
    draw = ImageDraw.Draw(image)
    width = max(image.width, min_width)
    wrapped = [row for line in lines for row in _wrap(draw, line, face, width - 8)]
    line_h = 14
    out = Image.new("RGB", (width, image.height + line_h * len(wrapped) + 6), "white")
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(wrapped):
        draw.text((4, image.height + 3 + i * line_h), row, fill=(20, 20, 20), font=face)
    return out


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line]


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  title: str = "") -> Image.Image:
    """Rows × columns of images with a row label on the left, column labels on top and a title."""
    h, w = images[0][0].height, images[0][0].width
    face = font(max(11, w // 24))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(face.size * 1.3) if hasattr(face, "size") else 14
    label_w = int(max(measure.textlength(t, font=face) for t in row_labels)) + 12
    title_lines = _wrap(measure, title, face, label_w + w * len(col_labels) - 8) if title else []
    top = line_h * (len(title_lines) + 1) + 4
    grid = Image.new("RGB", (label_w + w * len(col_labels), top + h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((4, 2 + i * line_h), line, fill="black", font=face)
    for c, label in enumerate(col_labels):
        draw.text((label_w + c * w + 4, top - line_h), label, fill="black", font=face)
    for r, (label, row) in enumerate(zip(row_labels, images)):
        draw.text((4, top + r * h + h // 2 - line_h // 2), label, fill="black", font=face)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (label_w + c * w, top + r * h))
    return grid
