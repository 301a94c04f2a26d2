"""The test-prompt grids that pick a checkpoint (rendering and grids: `dbnb.family.render`).

`sample_run` is `dbnb sample RUN_DIR`: the seed's users judge a run by eye with "<instance
prompt>, 1girl, solo" (fidelity) and the same with other clothes / places (flexibility),
comparing saved checkpoints. It loads the base pipeline once, swaps only the trained parts
per checkpoint, and writes one image per checkpoint × prompt × seed, a grid per prompt and
an HTML page, under RUN/tests/.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from dbnb.core.config import load_config
from dbnb.core.errors import DbnbError
from dbnb.core.precision import inference_dtype
from dbnb.core.progress import bar as tqdm
from dbnb.data.dataset import FILEWORDS, DatasetError, caption_for, concepts_from_config, list_images
from dbnb.family.render import (PREVIEW_SAMPLER, SAMPLERS, cpu_batch_size, guidance_rescale, labelled_grid,
                                make_scheduler, render)
from dbnb.family.base import family_of, pipeline_clip_skip, resolve_clip_skip
from dbnb.run.folder import RunFolder

if TYPE_CHECKING:
    from dbnb.run.checkpoints import Checkpoint


# The seed's way of choosing a checkpoint, made systematic:
#
#   RUN/tests/base/p0-s0.png, RUN/tests/step-000500/p0-s0.png …   one image per row × prompt × seed
#   RUN/tests/grid-0.png …                                        one grid per prompt: rows = steps, cols = seeds
#   RUN/tests/index.html                                          every grid and image, relative links
#   RUN/tests/manifest.json                                       what each image was made from (its cache key)

SCHEDULER = SAMPLERS[PREVIEW_SAMPLER][0]  # the manifest names it: images of another sampler are remade


class SampleError(DbnbError, RuntimeError):
    """Test images cannot be made as asked; the message names the setting or file and what to do."""


@dataclass(frozen=True)
class TestPrompt:
    __test__ = False  # not a pytest test class, whatever its name
    index: int
    kind: str        # "fidelity", "flexibility" or "class" (the class prompt alone: language drift)
    text: str        # what the model is asked
    negative: str
    clip_text: str   # what CLIP-T compares the images with: the instance prompt replaced by the class prompt
    size: tuple[int, int] | None = None  # (width, height) of the wide test image (test_wide); None: square

    @property
    def shape(self) -> str:
        """How the page and the grid name a wide prompt (" (wide 768×512)"); "" for a square one."""
        return f" (wide {self.size[0]}×{self.size[1]})" if self.size else ""


@dataclass(frozen=True)
class Row:
    name: str                 # folder under RUN/tests/: "base" or "step-000500"
    label: str                # "base model" or "step 500"
    step: int | None = None                 # None for the base model
    checkpoint: "Checkpoint | None" = None


@dataclass
class SampleResult:
    folder: Path
    rows: list[Row]
    prompts: list[TestPrompt]
    seeds: list[int]
    grids: list[Path]
    html: Path
    rendered: int = 0
    reused: int = 0
    seconds: dict = field(default_factory=dict)

    def image_path(self, row: Row, prompt: TestPrompt, seed: int) -> Path:
        return self.folder / image_name(row, prompt, seed)


def image_name(row: Row, prompt: TestPrompt, seed: int) -> str:
    return f"{row.name}/p{prompt.index}-s{seed}.png"


def _plain(prompt: str, words: str) -> str:
    """A training prompt with `[filewords]` (per-image captions) replaced by fixed words."""
    return " ".join(prompt.replace("[filewords]", words).split()).strip(" ,")


def _identity_words(c) -> str:
    """What `[filewords]` stands for in a test prompt: the tokens training put into every
    caption, or, without tokens, the captions' most common first tag (prep writes the
    character's name there)."""
    words = f"{c.instance_token} {c.class_token}".strip()
    if words or FILEWORDS not in c.instance_prompt:
        return words
    try:
        captions = [caption_for(p) for p in list_images(c.instance_data_dir, "instance_data_dir")]
    except DatasetError as e:
        raise SampleError(f"instance_prompt {c.instance_prompt!r} takes its words from the captions, and they "
                          f"cannot be read here ({e}) Pass instance_prompt=... (the character's words) after the "
                          "run folder, or instance_token=...") from None
    firsts = Counter(cap.split(",")[0].strip() for cap in captions if cap)
    if not firsts:
        raise SampleError(f"instance_prompt {c.instance_prompt!r} takes its words from the captions, but "
                          f"{c.instance_data_dir} has none: pass instance_prompt=... after the run folder.")
    return firsts.most_common(1)[0][0]


def fill_template(template: str, instance_prompt: str, class_prompt: str) -> str:
    text = template.replace("{instance_prompt}", instance_prompt).replace("{class_prompt}", class_prompt)
    return ", ".join(part.strip() for part in text.split(",") if part.strip())  # no ", ," when one is empty


def prompt_set(config) -> list[TestPrompt]:
    """Fidelity prompts, flexibility prompts, then the class prompt alone (when there is one).
    With a concepts_list, the first concept's prompts are used."""
    c = concepts_from_config(config)[0]
    instance = _plain(c.instance_prompt, _identity_words(c))
    klass = _plain(c.class_prompt, c.class_token)
    if not instance:
        raise SampleError("instance_prompt is empty in the run's config.json: test prompts need it "
                          "(pass instance_prompt=... after the run folder).")
    negative = config.test_negative_prompt
    if config.test_class_prompt_in_negative and klass:
        negative = ", ".join(p for p in (negative, klass) if p)
    prompts = []
    for kind, templates in (("fidelity", config.test_fidelity_prompts),
                            ("flexibility", config.test_flexibility_prompts)):
        for template in templates:
            prompts.append(TestPrompt(len(prompts), kind, fill_template(template, instance, klass), negative,
                                      fill_template(template, klass, klass)))
    if klass:  # never with the class prompt in the negative: this row shows what the class word became
        prompts.append(TestPrompt(len(prompts), "class", klass, config.test_negative_prompt, klass))
    first = next((p for p in prompts if p.kind == "fidelity"), None)
    if config.test_wide and first:  # last, so turning it on or off keeps the other images' names
        size = (wide_width(config.resolution, config.test_wide), config.resolution)
        prompts.append(dataclasses.replace(first, index=len(prompts), size=size))
    return prompts


def wide_width(resolution: int, ratio: float) -> int:
    """`ratio` × resolution, to the nearest multiple of 8 (the VAE's factor; diffusers asks for it)."""
    return max(8, round(resolution * ratio / 8) * 8)


def _fingerprint(path: Path) -> list:
    """Size and mtime: a checkpoint saved again at the same step gets its images remade."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _weights_key(row: Row, ema: bool, lora_scale: float) -> list:
    if row.checkpoint is None:
        return ["base"]
    key = [_fingerprint(f) for f in row.checkpoint.files(ema)]
    return key + ([lora_scale] if row.checkpoint.kind == "lora" else [])


def _image_key(settings: dict, weights: list, prompt: TestPrompt, seed: int) -> str:
    size = [list(prompt.size)] if prompt.size else []  # only when wide: square images keep their keys
    blob = json.dumps([settings, weights, prompt.text, prompt.negative, seed, *size], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _device_and_dtype(config, device: str | None) -> tuple[str, torch.dtype]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, inference_dtype(config.mixed_precision, device)


class TestPipeline:
    """The base pipeline loaded once; a row's trained parts are swapped in with load_state_dict."""
    __test__ = False

    def __init__(self, config, device: str, dtype: torch.dtype, ema: bool):
        family = family_of(config)
        self.models = family.open(config.pretrained_model_name_or_path,
                                  autoencoder=config.pretrained_vae_name_or_path, revision=config.revision, dtype=dtype)
        pipe = family.pipeline(self.models, self.models.denoiser)
        pipe.scheduler = make_scheduler(PREVIEW_SAMPLER, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.decode = partial(family.decode_latents, self.models.autoencoder)
        self.ema, self.config = ema, config
        self.clip_skip = pipeline_clip_skip(family, config.clip_skip)
        self.base_text = None  # a copy is kept only once a checkpoint brings its own text encoder
        self.current = "base"

    def use(self, row: Row) -> None:
        if row.name == self.current:
            return
        if row.checkpoint is None:
            raise SampleError("The base row must be rendered before any checkpoint is swapped in.")
        ckpt = row.checkpoint
        if ckpt.kind == "full" and ckpt.holds_encoder and self.base_text is None:
            self.base_text = {k: v.detach().to("cpu", copy=True) for k, v in self.models.encoder.state_dict().items()}
        elif not ckpt.holds_encoder and self.base_text is not None:
            self.models.encoder.load_state_dict(self.base_text)
        ckpt.load_into(self.models.denoiser, self.models.encoder, ema=self.ema, scale=self.config.lora_scale)
        self.current = row.name

    @torch.no_grad()
    def render(self, prompt: TestPrompt, seeds: list[int]) -> list[Image.Image]:
        """One image per seed, each from its own CPU generator: the same on every call."""
        c = self.config
        height, width = (prompt.size[1], prompt.size[0]) if prompt.size else (c.resolution, 0)
        return render(self.pipe, self.decode, prompt.text, seeds, negative=prompt.negative, steps=c.test_infer_steps,
                      guidance=c.test_guidance_scale, resolution=height, width=width, clip_skip=self.clip_skip)


def sample_run(run_dir: str | Path, overrides=(), *, ema: bool = False, device: str | None = None,
               force: bool = False, batch_size: int | None = None, progress: bool = True) -> SampleResult:
    """Test images of a run: base model and chosen checkpoints × test prompts × seeds, grids and
    index.html under RUN/tests/. Images already made with the same settings and weights are kept.
    `batch_size`: images per call (default: 4 on a GPU, cpu_batch_size on a CPU)."""
    run = RunFolder(run_dir)
    if not run.config_path.is_file():
        raise SampleError(f"{run.root} has no config.json: give the run folder (<output_dir>/<run_name>).")
    config = load_config(run.config_path, overrides)
    chosen = run.choose(config.test_steps)
    for c in chosen:
        c.require(ema)
    rows = [Row("base", "base model")] + [Row(c.name, f"step {c.step}", c.step, c) for c in chosen]
    prompts, seeds = prompt_set(config), list(range(config.test_seeds))
    device, dtype = _device_and_dtype(config, device)
    batch_size = batch_size or (cpu_batch_size(config.resolution) if device.startswith("cpu") else 4)
    settings = dict(model=config.pretrained_model_name_or_path, vae=config.pretrained_vae_name_or_path,
                    revision=config.revision, scheduler=SCHEDULER, guidance=config.test_guidance_scale,
                    infer_steps=config.test_infer_steps, resolution=config.resolution, ema=ema,
                    device=device.split(":")[0], dtype=str(dtype),
                    # each only where it changes the images, so images made before it was keyed keep their keys
                    **({"clip_skip": layer} if (layer := resolve_clip_skip(run.family, config.clip_skip))
                       != run.family.clip_skip else {}),
                    **({"guidance_rescale": rescale}
                       if (rescale := guidance_rescale(run.base_record().get("sampling", {}))) else {}))
    folder = run.tests_dir
    result = SampleResult(folder, rows, prompts, seeds, [], folder / "index.html")
    # The manifest keeps what every image on disk was made from, so a later call (more seeds,
    # new checkpoints, `dbnb score`) only makes what is missing or out of date.
    made = {n: k for n, k in _read_manifest(folder).get("images", {}).items() if (folder / n).is_file()}
    keys = {image_name(r, p, s): _image_key(settings, _weights_key(r, ema, config.lora_scale), p, s)
            for r in rows for p in prompts for s in seeds}
    todo = set(keys) if force else {n for n, k in keys.items() if made.get(n) != k}
    _render_missing(config, result, todo, device, dtype, ema, batch_size, progress)
    result.reused = len(keys) - len(todo)
    _write_manifest(folder, settings, result, {**made, **keys})
    result.grids = [write_grid(result, p) for p in prompts]
    write_html(result)
    return result


def _render_missing(config, result: SampleResult, todo: set[str], device, dtype, ema, batch_size, progress) -> None:
    if not todo:
        return

    started = time.perf_counter()
    tester = TestPipeline(config, device, dtype, ema)
    result.seconds["load"] = time.perf_counter() - started
    result.seconds.update(swap=0.0, render=0.0)
    with tqdm(total=len(todo), desc="test images", unit="img", disable=not progress) as bar:
        for row in result.rows:
            for prompt in result.prompts:
                seeds = [s for s in result.seeds if image_name(row, prompt, s) in todo]
                if not seeds:
                    continue
                t = time.perf_counter()
                tester.use(row)
                result.seconds["swap"] += time.perf_counter() - t
                (result.folder / row.name).mkdir(parents=True, exist_ok=True)
                for start in range(0, len(seeds), batch_size):
                    chunk = seeds[start:start + batch_size]
                    t = time.perf_counter()
                    for seed, image in zip(chunk, tester.render(prompt, chunk)):
                        image.save(result.image_path(row, prompt, seed))
                    result.seconds["render"] += time.perf_counter() - t
                    bar.update(len(chunk))
    result.rendered = len(todo)
    del tester
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, settings: dict, result: SampleResult, keys: dict) -> None:
    data = dict(settings=settings, seeds=result.seeds, prompts=[asdict(p) for p in result.prompts],
                rows=[dict(name=r.name, label=r.label, step=r.step) for r in result.rows], images=keys)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")


# --- grids and the page ---------------------------------------------------------------------------

def write_grid(result: SampleResult, prompt: TestPrompt) -> Path:
    images = [[Image.open(result.image_path(r, prompt, s)) for s in result.seeds] for r in result.rows]
    title = f"p{prompt.index} [{prompt.kind}{prompt.shape}] {prompt.text}"
    grid = labelled_grid(images, [r.label for r in result.rows], [f"seed {s}" for s in result.seeds], title)
    path = result.folder / RunFolder.TEST_GRID.format(prompt.index)
    grid.save(path)
    return path


KIND_HELP = {"fidelity": "should look like the training images",
             "flexibility": "should follow the new clothes / place and still be the character",
             "class": "the class prompt alone: should still look like the base model (language drift)"}
WIDE_HELP = (", wide too (test_wide): close-ups and back views in the training set break wide pictures "
             "(the guide's 花月 test)")


def write_html(result: SampleResult, scores: dict | None = None) -> Path:
    """index.html beside the images; links are relative so the folder can be zipped or moved."""
    e = html.escape
    parts = ["<!doctype html><meta charset='utf-8'><title>dbnb test prompts</title>",
             "<style>body{font-family:sans-serif}img{image-rendering:auto}td,th{padding:2px 6px}"
             "table{border-collapse:collapse}th{text-align:left}</style>",
             f"<h1>Test prompts: {e(result.folder.parent.name)}</h1>"]
    if scores:
        plot = os.path.relpath(RunFolder(result.folder.parent).scores_file(".png"), result.folder)
        parts.append(_scores_html(scores, Path(plot).as_posix()))
    for p in result.prompts:
        grid = RunFolder.TEST_GRID.format(p.index)
        parts.append(f"<h2 id='p{p.index}'>p{p.index} · {e(p.kind + p.shape)}: {e(p.text)}</h2>"
                     f"<p>{e(KIND_HELP.get(p.kind, '') + (WIDE_HELP if p.size else ''))}. Negative: <i>{e(p.negative)}</i></p>"
                     f"<p><a href='{grid}'>{grid}</a></p><table><tr><th></th>"
                     + "".join(f"<th>seed {s}</th>" for s in result.seeds) + "</tr>")
        for r in result.rows:
            cells = "".join(f"<td><a href='{e(image_name(r, p, s))}'><img src='{e(image_name(r, p, s))}' "
                            f"width='192' loading='lazy'></a></td>" for s in result.seeds)
            parts.append(f"<tr><th>{e(r.label)}</th>{cells}</tr>")
        parts.append("</table>")
    result.html.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return result.html


def _scores_html(scores: dict, plot: str) -> str:
    e = html.escape
    columns = scores["columns"]
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in scores["rows"])
    rec = scores.get("recommendation") or {}
    return (f"<h2>Scores</h2><p><b>Recommended: step {e(str(rec.get('step')))}</b> — {e(rec.get('rule', ''))}</p>"
            f"<table border='1'><tr>{head}</tr>{body}</table><p><img src='{e(plot)}'></p>")


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4f}"
    return "" if value is None else str(value)
