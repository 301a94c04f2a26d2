"""DreamBooth's effects in the tiny pretrained world, measured: the demo's run and the
settings the seed warns about, each scored by pixel analysis (dbnb.evaluate.scorers.world.metrics).

    python bench/bench_world.py [--steps 400] [--out /tmp/dbnb-world]

Runs, on one model and one set of 5 pictures and 50 generated class images:
  demo       hflip off, prior preservation on (the seed's settings)
  hflip      Apply Horizontal Flip on: the outfit's sides get swapped in samples
  no-prior   prior preservation off: "girl" drifts toward the trained character
and prints, per checkpoint, identity / swapped / copies / flexibility / drift / variety
(dbnb.evaluate.score.WorldScorer.columns) plus the wall time of each run, then the trade-off table: identity
("hnzk girl" draws the character) against flexibility ("hnzk girl, upper body" is drawn
upper body, a framing the full-body training pictures never show), and which checkpoints are
both faithful (>= 0.7) and flexible (>= 0.5). The overfitting curve (copies
rising with steps) is read off the demo run's checkpoints. Any Config setting can follow
as key=value and applies to every run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

# The seed's "slightly overfit, still flexible" target, as the world's shares.
FAITHFUL, FLEXIBLE = 0.7, 0.5
RUNS = {"demo": {}, "hflip": {"hflip": True}, "no-prior": {"with_prior_preservation": False}}


def trade_off(rows: list[dict], recommendation: dict) -> str:
    """identity against flexibility per checkpoint: where the run is both faithful and flexible."""
    lines = [f"{'checkpoint':>12} {'identity':>9} {'flexibility':>12}  both (>= {FAITHFUL:g} / >= {FLEXIBLE:g})"]
    for r in rows:
        both = (r["identity"] or 0) >= FAITHFUL and (r["flexibility"] or 0) >= FLEXIBLE
        mark = "  <- recommended" if r["checkpoint"] == recommendation["checkpoint"] else ""
        lines.append(f"{r['checkpoint']:>12} {r['identity']:9.3f} {r['flexibility']:12.3f}  {'yes' if both else 'no'}{mark}")
    return "\n".join(lines)


def main(argv=None) -> None:
    from dbnb.core.config import parse_override
    from dbnb.evaluate.score import WorldScorer, format_table
    from dbnb.world.demo import DEMO_STEPS, run_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/dbnb-world"))
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    common = dict(parse_override(o) for o in args.overrides)
    for name in args.runs:
        started = time.time()
        result = run_demo(args.out, steps=args.steps, run_name=name, **{**RUNS[name], **common})
        print(f"\n=== {name}: {RUNS[name] or 'the demo settings'}, {args.steps} steps, "
              f"{time.time() - started:.0f} s ===")
        print(format_table(result["scores"].rows, WorldScorer.columns), flush=True)
        print("\ntrade-off (the seed's 少し過学習気味, then check it still follows other prompts):")
        print(trade_off(result["scores"].rows, result["scores"].recommendation), flush=True)


if __name__ == "__main__":
    main()
