"""Images from a pipeline: training previews now, test-prompt grids later.

Every image has its own seeded generator, so the same prompt, seed and weights give the
same picture at any step — which is what makes previews of different steps comparable —
and sampling never touches the global RNG that training might use.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def make_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None) -> Image.Image:
    """Images in rows of `cols`, optionally with a caption strip over each."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    w, h = images[0].size
    strip = 14 if labels else 0
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(image.convert("RGB").resize((w, h)), (x, y + strip))
        if labels:
            draw.text((x + 2, y + 1), labels[i][: max(4, w // 6)], fill="black")
    return grid


@torch.no_grad()
def render(pipe, prompts: list[str], negative_prompt: str, num_per_prompt: int, seed: int,
           guidance_scale: float, steps: int, resolution: int) -> list[tuple[str, int, Image.Image]]:
    """(prompt, seed, image) for each prompt × seed; seeds are seed, seed+1, ..."""
    out = []
    for prompt in prompts:
        for k in range(num_per_prompt):
            generator = torch.Generator(device="cpu").manual_seed(seed + k)
            image = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                         guidance_scale=guidance_scale, height=resolution, width=resolution,
                         generator=generator, output_type="pil").images[0]
            out.append((prompt, seed + k, image))
    return out


def save_previews(results: list[tuple[str, int, Image.Image]], folder: Path, cols: int) -> Path:
    """PNG per image (p{prompt}-s{seed}.png) plus grid.png; returns the grid's path."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = list(dict.fromkeys(p for p, _, _ in results))
    for prompt, seed, image in results:
        image.save(folder / f"p{prompts.index(prompt)}-s{seed}.png")
    (folder / "prompts.txt").write_text("".join(f"p{i}: {p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    grid = make_grid([im for _, _, im in results], cols, [f"p{prompts.index(p)} s{s}" for p, s, _ in results])
    grid.save(folder / "grid.png")
    return folder / "grid.png"
