"""`dbnb score RUN_DIR`: numbers for the seed's by-eye checkpoint choice.

Per row of the test grid (the base model, then each chosen checkpoint) the scorer that
`score_with` names (`dbnb.evaluate.scorers.base`'s interface) gives fidelity and flexibility numbers:

- `clip` (default) — CLIP-I / DINO fidelity, CLIP-T flexibility and language drift, the
  DreamBooth paper's metrics (`dbnb.evaluate.scorers.clip`);
- `ccip` (anime characters) — deepghs' CCIP "same character" share and WD14 tag adherence
  (`dbnb.evaluate.scorers.ccip`);
- `world` — dbnb's tiny world model (the demo) by pixel analysis (`dbnb.evaluate.scorers.world.world_table`):
  identity, sides kept / swapped, copied poses, following the prompt, class drift and variety.

The recommendation: among trained checkpoints, the highest fidelity whose flexibility is within
`flexibility_tolerance` of the best trained checkpoint's; ties go to the earlier step.

Images come from `dbnb.evaluate.sample.sample_run` (made only when missing). Written: RUN/scores.csv,
scores.json, scores.png (matplotlib) and the scores on RUN/tests/index.html.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dbnb.core.config import load_config
from dbnb.data.dataset import concepts_from_config, list_images, load_rgb
from dbnb.evaluate.sample import sample_run, write_html
from dbnb.evaluate.scorers import ccip
from dbnb.evaluate.scorers import clip as clipscore
from dbnb.evaluate.scorers.base import Panel, ScoreError, Scorer, Series, Weighed
from dbnb.evaluate.scorers.world import world_table
from dbnb.run.folder import RunFolder


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def recommend(rows: list[dict], tolerance: float, weighed: Weighed = clipscore.WEIGHED) -> dict:
    """The most faithful trained checkpoint that is still flexible (the rule is in the result).
    `weighed` names the fidelity and flexibility columns: the scorer's (CLIP's by default)."""
    fid, flex, fid_name, flex_name = weighed
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


# --- the tiny world's pixel scores (score_with=world) ---------------------------------------------

class WorldScorer:
    columns = ("checkpoint", "step", "identity", "sides", "swapped", "copies", "flexibility", "drift", "variety")
    weighed = Weighed("identity", "flexibility",
                      "identity (share of samples with the character's hair and outfit sides)",
                      "following the prompt (framing / hair)")
    panels = (Panel("fidelity (share of images)", (Series("identity", "identity", "#1f77b4"),
                                                   Series("sides", "left side kept", "#ff7f0e"),
                                                   Series("copies", "copied poses", "#5a5a5a"))),
              Panel("prompt and class (share)", (Series("flexibility", "follows the prompt (framing / hair)", "#2ca02c"),
                                                 Series("drift", "class drift", "#d62728"),
                                                 Series("variety", "class variety", "#9467bd"))))

    def table(self, samples, instance: list[Image.Image]) -> list[dict]:
        return world_table(samples, instance)


def load_scorer(config, device: str) -> Scorer:
    """The scorer `score_with` names, its models loaded now: a missing one is said before the
    first test image is rendered, not minutes later."""
    if config.score_with == "world":
        return WorldScorer()
    if config.score_with == "ccip":
        return ccip.CcipScorer.load(config)
    return clipscore.ClipScorer(config.clip_model, config.dino_model, device)


# --- outputs --------------------------------------------------------------------------------------

def format_table(rows: list[dict], columns=clipscore.COLUMNS) -> str:
    def cell(v):
        return ("n/a" if not math.isfinite(v) else f"{v:.4f}") if isinstance(v, float) else str(v)
    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(cell(r[c]).rjust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, columns=clipscore.COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]) for c in columns} for r in rows)
    return path


RECOMMENDED_COLOUR = "#d62728"
MAX_STEP_TICKS = 10  # a tick per checkpoint up to this many; beyond, matplotlib's own


def score_figure(rows: list[dict], recommended: int | None = None, panels=clipscore.PANELS, size=(720, 520)):
    """Scores against training step (the base model at step 0, ticked "base"): a panel per group
    of series, each with its own y scale, legends beside them, the recommended step as a line.
    A matplotlib Figure without pyplot: nothing global, no display."""
    from matplotlib.figure import Figure  # lazy: loads matplotlib
    from matplotlib.ticker import FuncFormatter, MaxNLocator  # lazy: loads matplotlib

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    steps = sorted({r["step"] for r in rows})
    for ax, panel in zip(axes, panels):
        for series in panel.series:
            points = [(r["step"], r[series.column]) for r in rows if _finite(r.get(series.column))]
            if points:  # NaN (no images of that prompt kind) is left out, not drawn at 0
                ax.plot(*zip(*points), marker="o", markersize=5, linewidth=1.8, color=series.colour,
                        label=series.label)
        if recommended is not None:
            ax.axvline(recommended, color=RECOMMENDED_COLOUR, linestyle="--", linewidth=1.5,
                       label=f"recommended: step {recommended}")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    bottom = axes[-1]
    bottom.set_xlabel("training step")
    if len(steps) <= MAX_STEP_TICKS:
        bottom.set_xticks(steps, ["base" if s == 0 else str(s) for s in steps])
    else:
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "base" if v == 0 else f"{v:g}"))
    figure.suptitle("checkpoint scores by training step")
    return figure


def plot_scores(rows: list[dict], path: Path, recommended: int | None = None, size=(720, 520),
                panels=clipscore.PANELS) -> Path:
    """scores.png: `score_figure` as a PNG of `size` pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: loads matplotlib

    figure = score_figure(rows, recommended, panels, size)
    FigureCanvasAgg(figure).print_png(str(path))
    return path


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
    concept = concepts_from_config(config)[0]
    return [load_rgb(p, config.background_color) for p in list_images(concept.instance_data_dir, "instance_data_dir")]


def score_run(run_dir: str | Path, overrides=(), *, ema: bool = False, device: str | None = None,
              progress: bool = True) -> ScoreResult:
    """Scores of a run's test images (made first where missing): RUN/scores.csv, .png, .json."""
    run = RunFolder(run_dir)
    if not run.config_path.is_file():
        raise ScoreError(f"{run.root} has no config.json: give the run folder (<output_dir>/<run_name>).")
    config = load_config(run.config_path, overrides)
    if not config.test_fidelity_prompts:
        raise ScoreError("test_fidelity_prompts is empty: fidelity (CLIP-I, DINO) needs at least one prompt, "
                         "e.g. test_fidelity_prompts=['{instance_prompt}, 1girl, solo'].")
    instance = instance_images(config)
    scorer = load_scorer(config, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    samples = sample_run(run.root, overrides, ema=ema, device=device, progress=progress)
    rows = scorer.table(samples, instance)
    rec = recommend(rows, config.flexibility_tolerance, scorer.weighed)
    data = dict(columns=list(scorer.columns), rows=rows, recommendation=rec, score_with=config.score_with,
                clip_model=config.clip_model, dino_model=config.dino_model, ccip_model=config.ccip_model,
                instance_images=len(instance),
                seeds=samples.seeds,
                prompts=[dict(index=p.index, kind=p.kind, text=p.text, clip_text=p.clip_text, size=p.size)
                         for p in samples.prompts],
                ema=ema)
    json_path = run.scores_file(".json")
    json_path.write_text(json.dumps(_no_nan(data), indent=1, ensure_ascii=False), encoding="utf-8")
    result = ScoreResult(rows, rec, write_csv(rows, run.scores_file(".csv"), scorer.columns),
                         plot_scores(rows, run.scores_file(".png"), rec["step"], panels=scorer.panels), json_path,
                         write_html(samples, data))
    print(format_table(rows, scorer.columns))
    print(f"\nrecommended checkpoint: {rec['checkpoint']} ({rec['reason']})\nrule: {rec['rule']}")
    return result
