"""`dbnb score RUN_DIR`: numbers for the seed's by-eye checkpoint choice.

Per row of the test grid (the base model, then each chosen checkpoint):

- fidelity — CLIP-I and DINO, the DreamBooth paper's metrics: the mean cosine similarity of
  every fidelity-prompt image's embedding to every instance image's (paper, Table 1:
  DreamBooth (SD) 0.803 / 0.668, real images 0.885 / 0.774). `fidelity` = their mean.
- flexibility — CLIP-T: the mean cosine similarity of each flexibility-prompt image to its
  prompt's CLIP text embedding. The text is the prompt with `{instance_prompt}` replaced by
  the class prompt ("girl, 1girl, solo, swimsuit, beach"): CLIP has never seen the rare
  token, so leaving it in only adds noise, and the base row is judged on the same text.
- language drift — CLIP-T of the class-prompt-alone images against the class prompt;
  `drift` = base − checkpoint (positive: the class word lost meaning). `class_clip_i` (their
  CLIP-I to the instance images) rising says the class word is turning into the character.

The recommendation: among trained checkpoints, the highest fidelity whose CLIP-T is within
`flexibility_tolerance` of the best trained checkpoint's CLIP-T; ties go to the earlier step.

Images come from `dbnb.sample.sample_run` (made only when missing); embeddings from
transformers' CLIP and DINO ViT, preprocessed here with PIL/numpy (no torchvision).

`score_with=ccip` (anime characters): fidelity = the share of (fidelity image, instance
picture) pairs that deepghs' CCIP judges the same character (`dbnb.ccip`), flexibility = tag
adherence, the share of the flexibility prompts' asked-for tags ("school uniform", "beach")
that the WD14 tagger finds in their images. The same recommendation rule.

`score_with=world` scores runs on dbnb's tiny world model (the demo) by pixel analysis
instead (`dbnb.world.metrics`): identity, sides kept / swapped, copied poses, following the prompt
(a framing the training pictures never show), class drift and variety. No other model is needed.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from dbnb.errors import DbnbError

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
COLUMNS = ("checkpoint", "step", "clip_i", "dino", "fidelity", "clip_t", "class_clip_t", "drift", "class_clip_i")


class ScoreError(DbnbError, RuntimeError):
    """Scores cannot be computed; the message names the setting or file and what to do."""


# --- embeddings -----------------------------------------------------------------------------------

def preprocess(images: list[Image.Image], size: int, mean, std) -> torch.Tensor:
    """[N, 3, size, size]: center square, bicubic resize, normalized as the model was trained."""
    arrays = [np.asarray(ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC),
                         dtype=np.float32) / 255.0 for im in images]
    batch = (np.stack(arrays) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns an output object (the projected embedding is pooler_output); 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class Embedder:
    """Unit-length image (and, for CLIP, text) embeddings from one model."""

    def __init__(self, kind: str, model, size: int, mean, std, tokenizer=None, device: str = "cpu",
                 batch_size: int = 32):
        self.kind, self.size, self.mean, self.std = kind, size, mean, std
        self.model, self.tokenizer = model.to(device).eval(), tokenizer
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess(images[start:start + self.batch_size], self.size, self.mean, self.std)
            pixels = pixels.to(self.device)
            if self.kind == "clip":
                features = _pooled(self.model.get_image_features(pixel_values=pixels))
            else:  # DINO: the CLS token of the last layer, as in the DreamBooth paper
                features = self.model(pixel_values=pixels).last_hidden_state[:, 0]
            chunks.append(features.float().cpu())
        return torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ScoreError(f"The {self.kind} model has no text tower; CLIP-T needs clip_model.")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        features = _pooled(self.model.get_text_features(input_ids=tokens.input_ids,
                                                        attention_mask=tokens.attention_mask))
        return torch.nn.functional.normalize(features.float().cpu(), dim=-1)


def _load_error(setting: str, name: str, e: Exception) -> ScoreError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ScoreError(f"{setting}: cannot load {name!r} ({first}). It is downloaded from the Hugging Face Hub on "
                      f"first use; without internet, copy the model folder here and set {setting}=/path/to/it.")


def load_clip(name: str, device: str = "cpu") -> Embedder:
    from transformers import CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _load_error("clip_model", name, e) from None
    return Embedder("clip", model, model.config.vision_config.image_size, CLIP_MEAN, CLIP_STD, tokenizer, device)


def load_dino(name: str, device: str = "cpu") -> Embedder:
    from transformers import ViTModel

    try:  # the DINO checkpoints carry no pooler; only the CLS token is used
        model = ViTModel.from_pretrained(name, add_pooling_layer=False)
    except (OSError, ValueError) as e:
        raise _load_error("dino_model", name, e) from None
    return Embedder("dino", model, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD, None, device)


# --- the numbers ----------------------------------------------------------------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities (rows normalized here, so any embeddings do)."""
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.T).clamp(-1.0, 1.0)  # rounding can put a self-similarity at 1.0000001


def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """CLIP-I / DINO: the mean over all pairs (generated image, instance image)."""
    return float(cosine(a, b).mean()) if len(a) and len(b) else math.nan


def paired_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """CLIP-T: the mean over images of the similarity to their own prompt (row i ↔ text i)."""
    if not len(images):
        return math.nan
    a, b = torch.nn.functional.normalize(images, dim=-1), torch.nn.functional.normalize(texts, dim=-1)
    return float((a * b).sum(-1).clamp(-1.0, 1.0).mean())


def _row_images(samples, row, kind: str, texts: torch.Tensor) -> tuple[list[Image.Image], torch.Tensor]:
    """A row's images of one prompt kind, and the CLIP-T text embedding of each."""
    pairs = [(p, s) for p in samples.prompts if p.kind == kind for s in samples.seeds]
    images = [Image.open(samples.image_path(row, p, s)).convert("RGB") for p, s in pairs]
    return images, texts[[p.index for p, _ in pairs]]


def score_table(samples, instance: list[Image.Image], clip: Embedder, dino: Embedder) -> list[dict]:
    """One dict per row of `samples` (a dbnb.sample.SampleResult), with COLUMNS as keys."""
    inst_clip, inst_dino = clip.images(instance), dino.images(instance)
    texts = clip.texts([p.clip_text for p in samples.prompts])
    rows = []
    for row in samples.rows:
        fid, _ = _row_images(samples, row, "fidelity", texts)
        flex, flex_texts = _row_images(samples, row, "flexibility", texts)
        klass, class_texts = _row_images(samples, row, "class", texts)
        class_emb = clip.images(klass) if klass else inst_clip[:0]
        clip_i, dino_i = mean_similarity(clip.images(fid), inst_clip), mean_similarity(dino.images(fid), inst_dino)
        rows.append(dict(checkpoint="base" if row.step is None else row.name, step=row.step or 0,
                         clip_i=clip_i, dino=dino_i, fidelity=(clip_i + dino_i) / 2,
                         clip_t=paired_similarity(clip.images(flex), flex_texts) if flex else math.nan,
                         class_clip_t=paired_similarity(class_emb, class_texts),
                         class_clip_i=mean_similarity(class_emb, inst_clip)))
    for r in rows:  # the base model is rows[0]
        r["drift"] = rows[0]["class_clip_t"] - r["class_clip_t"]
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def recommend(rows: list[dict], tolerance: float, scores=None) -> dict:
    """The most faithful trained checkpoint that is still flexible (the rule is in the result).
    `scores` names the fidelity and flexibility columns: CLIP's by default, or WORLD_SCORES."""
    fid, flex, fid_name, flex_name = scores or CLIP_SCORES
    trained = [r for r in rows if r["checkpoint"] != "base" and _finite(r[fid])]
    if not trained:
        raise ScoreError("No trained checkpoint with a fidelity score to recommend: train first (dbnb train).")
    flexible = [r for r in trained if _finite(r[flex])]
    best = max((r[flex] for r in flexible), default=math.nan)
    # 1e-9: a checkpoint exactly `tolerance` below the best is within it despite float rounding
    eligible = [r for r in flexible if r[flex] >= best - tolerance - 1e-9] or trained
    pick = max(eligible, key=lambda r: (r[fid], -r["step"]))
    rule = (f"highest fidelity = {fid_name} among trained checkpoints whose flexibility {flex_name} is within "
            f"flexibility_tolerance={tolerance:g} of the best trained checkpoint's; ties go to the earlier step")
    if not flexible:
        rule = f"highest fidelity = {fid_name} among trained checkpoints (no flexibility prompts to check)"
    reason = (f"fidelity {pick[fid]:.4f}" + (f", {flex_name} {pick[flex]:.4f} (best {best:.4f}, "
                                             f"{len(eligible)} of {len(trained)} within tolerance)"
                                             if flexible else ""))
    return dict(step=pick["step"], checkpoint=pick["checkpoint"], rule=rule, reason=reason,
                fidelity=pick[fid], clip_t=pick[flex], best_clip_t=best, tolerance=tolerance)


CLIP_SCORES = ("fidelity", "clip_t", "mean(CLIP-I, DINO)", "CLIP-T")


# --- the tiny world's pixel scores (score_with=world) ---------------------------------------------

WORLD_COLUMNS = ("checkpoint", "step", "identity", "sides", "swapped", "copies", "flexibility", "drift",
                 "variety")
WORLD_SCORES = ("identity", "flexibility", "identity (share of samples with the character's hair and outfit sides)",
                "following the prompt (framing / hair)")


def world_table(samples, instance: list[Image.Image]) -> list[dict]:
    """dbnb.world.metrics per row: the character is read off the instance images."""
    from dbnb import world

    try:
        character = world.character_of(instance)
    except ValueError as e:
        raise ScoreError(f"score_with=world: the instance images are not pictures of dbnb's tiny world ({e}). "
                         "Use score_with=clip for real models.") from None
    rows = []
    for row in samples.rows:
        def images(kind):
            return [(p.text, Image.open(samples.image_path(row, p, s)).convert("RGB"))
                    for p in samples.prompts if p.kind == kind for s in samples.seeds]
        scores = world.metrics([im for _, im in images("fidelity")], images("flexibility"),
                               [im for _, im in images("class")], character, instance)
        rows.append(dict(checkpoint="base" if row.step is None else row.name, step=row.step or 0, **scores))
    return rows


# --- CCIP and tag adherence (score_with=ccip: anime characters) -----------------------------------

CCIP_COLUMNS = ("checkpoint", "step", "ccip", "ccip_difference", "tag_adherence", "class_ccip")
CCIP_SCORES = ("ccip", "tag_adherence", "CCIP (share of (test image, instance picture) pairs judged the same "
               "character)", "tag adherence")


def asked_tags(prompt: str, fidelity_prompts: list[str], vocabulary) -> list[str]:
    """The tagger names of what a flexibility prompt asks for beyond the fidelity prompts
    ("…, 1girl, solo, school uniform, classroom" → school_uniform, classroom): its
    comma-separated parts that are tagger tags and in no fidelity prompt."""
    def names(text):
        return [" ".join(t.split()).lower().replace(r"\(", "(").replace(r"\)", ")").replace(" ", "_")
                for t in text.split(",")]
    common = {n for f in fidelity_prompts for n in names(f)}
    return [n for n in dict.fromkeys(names(prompt)) if n in vocabulary and n not in common]


def tag_adherence(tagger, images: list[tuple[str, Image.Image]], fidelity_prompts: list[str], config) -> float:
    """Share of (flexibility image, asked-for tag) pairs in which the tagger finds the tag."""
    asked = [asked_tags(text, fidelity_prompts, tagger.categories) for text, _ in images]
    if not any(asked):
        return math.nan
    found = tagger.detect([im for _, im in images], config.tag_threshold, config.character_tag_threshold)
    hits = [tag in tags for wanted, tags in zip(asked, found) for tag in wanted]
    return sum(hits) / len(hits)


def ccip_table(samples, instance: list[Image.Image], ccip, tagger, config) -> list[dict]:
    """CCIP fidelity per row (and of the class-prompt images: the class word turning into the
    character), tag adherence of the flexibility images."""
    from dbnb.ccip import fidelity

    reference = ccip.features(instance)
    fidelity_texts = [p.text for p in samples.prompts if p.kind == "fidelity"]
    rows = []
    for row in samples.rows:
        def images(kind):
            return [(p.text, Image.open(samples.image_path(row, p, s)).convert("RGB"))
                    for p in samples.prompts if p.kind == kind for s in samples.seeds]
        same, diff = fidelity(ccip, ccip.features([im for _, im in images("fidelity")]), reference)
        klass = [im for _, im in images("class")]
        flex = images("flexibility")
        rows.append(dict(checkpoint="base" if row.step is None else row.name, step=row.step or 0, ccip=same,
                         ccip_difference=diff,
                         tag_adherence=tag_adherence(tagger, flex, fidelity_texts, config) if flex else math.nan,
                         class_ccip=fidelity(ccip, ccip.features(klass), reference)[0] if klass else math.nan))
    return rows


# --- outputs --------------------------------------------------------------------------------------

def format_table(rows: list[dict], columns=COLUMNS) -> str:
    def cell(v):
        return ("n/a" if not math.isfinite(v) else f"{v:.4f}") if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r[c]).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, columns=COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]) for c in columns} for r in rows)
    return path


FIDELITY_SERIES = (("clip_i", "CLIP-I", (31, 119, 180)), ("dino", "DINO", (255, 127, 14)),
                   ("fidelity", "fidelity", (90, 90, 90)))
FLEXIBILITY_SERIES = (("clip_t", "CLIP-T (flexibility)", (44, 160, 44)),
                      ("class_clip_t", "CLIP-T (class prompt)", (148, 103, 189)))
CLIP_PANELS = (FIDELITY_SERIES, FLEXIBILITY_SERIES)
WORLD_PANELS = ((("identity", "identity", (31, 119, 180)), ("sides", "left side kept", (255, 127, 14)),
                 ("copies", "copied poses", (90, 90, 90))),
                (("flexibility", "hair follows prompt", (44, 160, 44)), ("drift", "class drift", (214, 39, 40)),
                 ("variety", "class variety", (148, 103, 189))))
CCIP_PANELS = ((("ccip", "CCIP same character", (31, 119, 180)),
                 ("class_ccip", "class images as character", (214, 39, 40))),
               (("tag_adherence", "tag adherence", (44, 160, 44)),))


def plot_scores(rows: list[dict], path: Path, recommended: int | None = None, size=(720, 520),
                panels=CLIP_PANELS) -> Path:
    """Scores against step (the base model at step 0), drawn with PIL: no matplotlib needed.
    Two panels with their own scales: CLIP-T moves by hundredths, fidelity by tenths."""
    from dbnb.images import font as pil_font

    w, h = size
    image = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(image), pil_font(12)
    x_max = max(r["step"] for r in rows) or 1
    px = lambda s: 60 + (w - 250) * s / x_max  # noqa: E731
    half = (h - 40) // 2
    for i, series in enumerate(panels):
        _panel(d, font, rows, series, px, top=10 + i * half, bottom=i * half + half - 10, right=w - 190)
    for r in rows:
        d.text((px(r["step"]) - 10, h - 34), "base" if r["step"] == 0 else str(r["step"]), fill="black", font=font)
    d.text((w - 150, h - 34), "step", fill="black", font=font)
    if recommended is not None:
        d.line([px(recommended), 10, px(recommended), h - 40], fill=(214, 39, 40), width=2)
        d.text((w - 180, 10 + 20 * len(panels[0]) + 10), f"recommended: {recommended}", fill=(214, 39, 40),
               font=font)
    image.save(path)
    return path


def _panel(d, font, rows, series, px, top: int, bottom: int, right: int) -> None:
    values = [r[k] for r in rows for k, _, _ in series if _finite(r.get(k))] or [0.0]
    lo, hi = min(values), max(values)
    pad = 0.05 if hi - lo < 1e-6 else 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    py = lambda v: top + (bottom - top) * (hi - v) / (hi - lo)  # noqa: E731
    d.rectangle([60, top, right, bottom], outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        d.line([56, py(v), 60, py(v)], fill="black")
        d.text((4, py(v) - 7), f"{v:.3f}", fill="black", font=font)
    for i, (key, label, colour) in enumerate(series):
        points = [(px(r["step"]), py(r[key])) for r in rows if _finite(r.get(key))]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        for x, y in points:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.line([right + 10, top + 20 * i + 7, right + 30, top + 20 * i + 7], fill=colour, width=3)
        d.text((right + 35, top + 20 * i), label, fill="black", font=font)


def _no_nan(value):
    """NaN (a score with no images to compute it on) as null: strict JSON readers refuse NaN."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class ScoreResult:
    rows: list[dict]
    recommendation: dict
    csv: Path
    plot: Path
    json: Path
    html: Path


def instance_images(config) -> list[Image.Image]:
    """The first concept's training images, transparency put on the training background."""
    from dbnb.data import concepts_from_config, list_images, load_rgb

    concept = concepts_from_config(config)[0]
    return [load_rgb(p, config.background_color) for p in list_images(concept.instance_data_dir, "instance_data_dir")]


def score_run(run_dir: str | Path, overrides=(), *, ema: bool = False, device: str | None = None,
              progress: bool = True) -> ScoreResult:
    """Scores of a run's test images (made first where missing): RUN/scores.csv, .png, .json."""
    from dbnb.config import load_config
    from dbnb.sample import sample_run, write_html

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ScoreError(f"{run} has no config.json: give the run folder (<output_dir>/<run_name>).")
    config = load_config(run / "config.json", overrides)
    world = config.score_with == "world"
    if not config.test_fidelity_prompts:
        raise ScoreError("test_fidelity_prompts is empty: fidelity (CLIP-I, DINO) needs at least one prompt, "
                         "e.g. test_fidelity_prompts=['{instance_prompt}, 1girl, solo'].")
    instance = instance_images(config)
    if config.score_with == "ccip":  # loaded first: a missing model must not wait for the sampling
        from dbnb.ccip import load_ccip
        from dbnb.prep.tagger import load_tagger

        ccip = load_ccip(config.ccip_model)
        tagger = load_tagger(config.tagger_model) if config.test_flexibility_prompts else None
    samples = sample_run(run, overrides, ema=ema, device=device, progress=progress)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world:
        rows, columns, panels = world_table(samples, instance), WORLD_COLUMNS, WORLD_PANELS
    elif config.score_with == "ccip":
        rows, columns, panels = ccip_table(samples, instance, ccip, tagger, config), CCIP_COLUMNS, CCIP_PANELS
    else:
        rows = score_table(samples, instance, load_clip(config.clip_model, device),
                           load_dino(config.dino_model, device))
        columns, panels = COLUMNS, CLIP_PANELS
    rec = recommend(rows, config.flexibility_tolerance,
                    {"world": WORLD_SCORES, "ccip": CCIP_SCORES}.get(config.score_with, CLIP_SCORES))
    data = dict(columns=list(columns), rows=rows, recommendation=rec, score_with=config.score_with,
                clip_model=config.clip_model, dino_model=config.dino_model, ccip_model=config.ccip_model,
                instance_images=len(instance),
                seeds=samples.seeds,
                prompts=[dict(index=p.index, kind=p.kind, text=p.text, clip_text=p.clip_text) for p in samples.prompts],
                ema=ema)
    json_path = run / "scores.json"
    json_path.write_text(json.dumps(_no_nan(data), indent=1, ensure_ascii=False), encoding="utf-8")
    result = ScoreResult(rows, rec, write_csv(rows, run / "scores.csv", columns),
                         plot_scores(rows, run / "scores.png", rec["step"], panels=panels), json_path,
                         write_html(samples, data))
    print(format_table(rows, columns))
    print(f"\nrecommended checkpoint: {rec['checkpoint']} ({rec['reason']})\nrule: {rec['rule']}")
    return result
