"""docs/performance.md, written from bench/gpu_suite.py's results files and nothing else.

    python bench/gpu_report.py [docs]      # the same as: python bench/gpu_suite.py --write-doc

Each `<folder>/gpu-results/*.json` becomes one table (one per GPU and date; a dry run's is marked
as such); beside them the published figures with the planner's predictions and the
memory_profile=auto table (`<folder>/cpu-results/plan.json`, bench/bench_plan.py --record). With no GPU results the doc says so. Each `<folder>/cpu-results/*.json`
(bench/hot_path.py --record) becomes a before / after table of the training step's hot path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dbnb.train.memory import BASIS, NO_GPU, PUBLISHED, settings_text  # noqa: E402

T4_CARD = "T4 15 GB"
EXTRA_NAMES = {"classimages": "class images", "preview": "preview during training", "export": "export fp16",
               "bake": "--bake (LoRA into the model)", "load": "load the exported single file",
               "hf": "diffusers' train_dreambooth.py, profile 1's settings",
               "deterministic": "deterministic=true, two runs compared"}

HOW_TO_RUN = """## How to run it

On a machine with a CUDA GPU, from this checkout:

    python bench/gpu_suite.py                # every profile and extra, about 6-8 minutes
    python bench/gpu_suite.py --only 1,2,export --hf-script train_dreambooth.py

It checks in its first second that torch, diffusers, transformers, accelerate, safetensors,
huggingface_hub, Pillow, numpy, tqdm, PyYAML and bitsandbytes import (xformers is optional:
profile 8 is skipped without it), builds an SD 1.5-size model with random weights (no download,
cached in /tmp/dbnb-gpu-suite; for profiles 10-11 an SDXL-size one, about 7 GB, trained at 1024 px;
11, a full SDXL fine-tune, runs on a 40 GB+ card only), runs each profile in a process of its own, writes
`docs/gpu-results/<gpu>-<date>.json` and rebuilds this page from every results file.
`python bench/gpu_suite.py --dry-run` runs the same code paths on the tiny model on a CPU in
seconds (the test suite runs it).

A GPU box without a network and without diffusers / bitsandbytes / xformers (Python 3.12,
torch 2.11): download their wheels where pip works, with `--no-deps` (diffusers 0.42.1
py3-none-any, bitsandbytes 0.50.2 manylinux_2_24, xformers only if its wheel matches that torch),
take them along, then
`python3 -m pip install --no-index --no-deps --target /tmp/site *.whl && PYTHONPATH=/tmp/site python3 bench/gpu_suite.py`.
Commit the results file and this page. Runs with `--only` on the same GPU and day add to its
table, so a short device lease can take the suite in two calls, e.g. `--only 1,2,3,4,5,export,load`
then `--only 6,7,8,9,classimages,preview,hf` and `--only 10,11` (each call on a fresh machine builds
the model again: about a minute, a few for the SDXL).
"""


def gib(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def yes_no(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def profile_table(result: dict) -> list[str]:
    lines = ["| # | profile | status | steps/s | VRAM allocated (GiB) | reserved (GiB) | reserved + context (GiB) "
             f"| fits {' | fits '.join(c for c in _cards(result))} | loss finite | peak RAM (GiB) "
             "| planner: allocated (GiB) | measured / planner |",
             "|---|---|---|---|---|---|---|" + "---|" * len(_cards(result)) + "---|---|---|---|"]
    base = next((r for r in result["profiles"] if r["id"] == 1 and r["status"] == "ok"), None)
    for row in result["profiles"]:
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        rate = row.get("steps_per_s")
        rate_text = "-" if rate is None else f"{rate:.2f}"
        if row.get("compared_to") == 1 and base and rate and row.get("vram_allocated_gib") is not None:
            rate_text += f" ({rate / base['steps_per_s']:.2f}x of 1)"
            status += f"; VRAM {row['vram_allocated_gib'] / base['vram_allocated_gib']:.2f}x of profile 1"
        fit = row.get("fits", {})
        cells = [str(row["id"]), row["name"], status.replace("|", "/"), rate_text, gib(row.get("vram_allocated_gib")),
                 gib(row.get("vram_reserved_gib")), gib(row.get("need_gib")),
                 *[yes_no(fit.get(card)) for card in _cards(result)], yes_no(row.get("loss_finite")),
                 gib(row.get("peak_rss_gib")), gib(row.get("predicted_allocated_gib")), measured_over_predicted(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def measured_over_predicted(row: dict) -> str:
    measured, predicted = row.get("vram_allocated_gib"), row.get("predicted_allocated_gib")
    return f"{measured / predicted:.2f}" if measured and predicted else "-"


def _cards(result: dict) -> list[str]:
    return list(result["plan"]["cards"])


def extra_figure(name: str, row: dict, result: dict) -> str:
    if row["status"] != "ok":
        return "-"
    memory = f"peak VRAM {gib(row.get('vram_allocated_gib'))} GiB, " if row.get("vram_allocated_gib") else ""
    ram = f"peak RAM {gib(row.get('peak_rss_gib'))} GiB"
    plan = result["plan"]
    if name == "classimages":
        return (f"{row['images_per_s']:.2f} images/s ({row['images']} images, batch {row['batch']} (auto), "
                f"{row['steps']} steps, {plan['resolution']} px); {memory}{ram}")
    if name == "preview":
        return f"about {row['preview_s']:.1f} s per preview; {memory}{ram}"
    if name in ("export", "load"):
        size = f", {row['size_gib']:.2f} GiB file" if name == "export" else ""
        return f"{row['seconds']:.1f} s{size}; {ram}"
    if name == "hf":
        base = next((r for r in result["profiles"] if r["id"] == 1 and r["status"] == "ok"), None)
        text = f"{row['steps_per_s']:.2f} steps/s, {memory}{ram}"
        if base and row.get("steps_per_s"):
            text += f"; dbnb / diffusers: steps/s {base['steps_per_s'] / row['steps_per_s']:.2f}x"
            if row.get("vram_allocated_gib"):
                text += f", peak VRAM {base['vram_allocated_gib'] / row['vram_allocated_gib']:.2f}x"
        return text + " (diffusers' script has no latent cache)"
    if name == "deterministic":
        base = next((r for r in result["profiles"] if r["id"] == 1 and r["status"] == "ok"), None)
        same = ("bitwise equal" if row["differing"] == 0 else
                f"{row['differing']} of {row['tensors']} UNet tensors differ (max |dw| {row['max_abs_diff']:.2e})")
        text = f"two runs of profile 1 with deterministic=true: {same}; {row['steps_per_s']:.2f} steps/s"
        if base:
            text += f" ({row['steps_per_s'] / base['steps_per_s']:.2f}x profile 1's, deterministic off)"
        return f"{text}; {memory}{ram}"
    return "-"


def result_section(result: dict) -> list[str]:
    m, plan = result["machine"], result["plan"]
    vram = f", {m['vram_gib']:.1f} GiB" if m.get("vram_gib") else ""
    title = f"### {m['gpu']}{vram}, {m['date']}"
    lines = [title + (" — dry run" if m["dry_run"] else ""), ""]
    if m["dry_run"]:
        lines += ["A dry run: the tiny model on the CPU, fp16 and 8-bit Adam replaced by fp32 and torch AdamW. "
                  "It proves the code paths run; its numbers are not performance figures.", ""]
    lines += [f"Python {m['python']}, torch {m['torch']} (CUDA {m['cuda_version']}), diffusers {m['diffusers']}, "
              f"transformers {m['transformers']}, accelerate {m['accelerate']}, bitsandbytes {m['bitsandbytes']} "
              f"({m['bitsandbytes_check']}), xformers {m['xformers']} ({m['xformers_check']}). Model: {plan['model']}, "
              f"{plan['resolution']} px, {plan['steps']} steps per profile of which the first {plan['warmup']} untimed; "
              f"{result.get('seconds', 0):.0f} s in all.", ""]
    lines += profile_table(result)
    lines += ["", "| extra | status | figure |", "|---|---|---|"]
    for name, row in result["extras"].items():
        status = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
        lines.append(f"| {EXTRA_NAMES.get(name, name)} | {status.replace('|', '/')} | {extra_figure(name, row, result)} |")
    if not m["dry_run"]:
        lines += ["", t4_meaning(result)]
    return lines + [""]


def t4_meaning(result: dict) -> str:
    ok = [r for r in result["profiles"] if r["status"] == "ok" and r.get("fits")]
    fitting = [r for r in ok if r["fits"].get(T4_CARD)]
    if not ok:
        return "**For a Colab T4 user:** no profile completed here, so this run says nothing about a T4 yet."
    text = (f"**For a Colab T4 user:** of the profiles that ran, {', '.join(str(r['id']) for r in fitting) or 'none'} "
            f"fit a T4's {result['plan']['cards'][T4_CARD]} GiB by peak reserved + this GPU's CUDA "
            "context (a T4's context and kernels' workspaces differ; its speed is far lower than this GPU's).")
    if fitting:
        fastest = max(fitting, key=lambda r: r.get("steps_per_s") or 0)
        text += f" The fastest of them here: profile {fastest['id']} ({fastest['name']})."
    return text


def published_section(planned: dict | None) -> list[str]:
    """Other trainers' figures, and beside them the planner's for the same settings (bench/bench_plan.py --record)."""
    rows = planned["published"] if planned else [
        {"source": p.source, "gpu": p.gpu, "settings": p.settings, "published_gb": p.vram_gb, "note": p.note}
        for p in PUBLISHED]
    lines = ["## Published figures (other trainers, SD 1.x DreamBooth, 512 px, batch 1) and the planner's", "",
             "Predicted: `dbnb plan` with the same settings (dbnb's own step: the VAE in fp32, SDPA attention), "
             "in GB of 10^9 bytes like the published figures; a row without dbnb settings like its own has none. "
             + (f"Recorded by `python bench/bench_plan.py --record docs` on {planned['machine']}." if planned else
                "Run `python bench/bench_plan.py --record docs` for the predicted column."), "",
             "| source | GPU | settings | published VRAM (GB) | predicted (GB) | predicted / published | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['gpu']} | {r['settings']} | {r['published_gb'] or '-'} | "
                     f"{r.get('predicted_gb', '-')} | {r.get('ratio', '-')} | {r['note']} |")
    return lines + [""] + reference_lines(planned or {})


def reference_lines(planned: dict) -> list[str]:
    """The planner against the whole step under torch's MemTracker (SD 1.5, default settings otherwise)."""
    if not planned.get("reference"):
        return []
    lines = [f"`dbnb plan` on the default config answered in {planned['seconds']} s (a fresh process). Against "
             "the reference, the whole step (torch's fused AdamW, two steps) on fake tensors counted by MemTracker:", "",
             "| resolution | settings | planner (GiB allocated) | reference (GiB) | reference took (s) |",
             "|---|---|---|---|---|"]
    for r in planned["reference"]:
        lines.append(f"| {r['resolution']} px | {r['settings']} | {r['planner_gib']:.3f} | {r['reference_gib']:.3f} "
                     f"| {r['reference_s']} |")
    return lines + [""]


def auto_section(planned: dict | None) -> list[str]:
    lines = ["## What memory_profile=auto chooses", "", f"From dbnb/train/memory.py; based on {BASIS}. "
             "The default settings (SD 1.5, 512 px, batch 1, text encoder trained, cached latents); the fastest "
             "combination that fits each card with the planner's margin.", ""]
    if not planned:
        return lines + ["Run `python bench/bench_plan.py --record docs` for the table.", ""]
    lines += ["| card | VRAM (GiB, as torch reports it) | settings | predicted peak (GiB) | fits |", "|---|---|---|---|---|"]
    for r in planned["auto"]:
        lines.append(f"| {r['card']} | {r['total_gib']:g} | {r['settings']} | {r['predicted_gib']:.2f} | "
                     f"{yes_no(r['fits'])} |")
    lines.append(f"| no CUDA GPU | - | {settings_text(NO_GPU)} | - | - |")
    return lines + [""]


def cpu_section(result: dict) -> list[str]:
    m, before, after = result["machine"], result["before"], result["after"]
    runs = [k for k in after["tiny"] if k in before["tiny"]]

    def per_run(figures, key, fmt):
        return " / ".join(format(figures["tiny"][k][key], fmt) if isinstance(figures["tiny"][k][key], float)
                          else str(figures["tiny"][k][key]) for k in runs)
    scan = after.get("sd15_scan")
    lines = [f"### {m['cpu']}, {m['date']}", "",
             f"Python {m['python']}, torch {m['torch']}; `python bench/hot_path.py` with dbnb from {before['code']} "
             f"(before) and {after['code']} (after), one after the other on this machine. Tiny model, 64 px, "
             f"batch 1, steps {after['warmup'] + 1}-{after['steps']} timed; runs: {' / '.join(runs)}.", "",
             "| figure | before | after |", "|---|---|---|",
             f"| host reads per optimizer step ({' / '.join(runs)}) | {per_run(before, 'reads_per_step', '.2f')} "
             f"| {per_run(after, 'reads_per_step', '.2f')} |",
             f"| steps/s, tiny model on the CPU ({' / '.join(runs)}) | {per_run(before, 'steps_per_s', '.1f')} "
             f"| {per_run(after, 'steps_per_s', '.1f')} |",
             f"| pictures in RAM per 100 at 512 px, before the latent cache | {before['picture_mib_per_100']:.0f} MiB "
             f"| {after['picture_mib_per_100']:.0f} MiB |",
             f"| pictures held while training with cached latents | "
             f"{before['tiny'][runs[0]]['pictures_held_while_training']} | "
             f"{after['tiny'][runs[0]]['pictures_held_while_training']} |"]
    if scan:
        lines.append(f"| pre-save inf/NaN scan, SD 1.5 UNet ({scan['weights'] / 1e6:.0f} M weights) + AdamW state, "
                     f"fp32 on the CPU (best of {scan['repeat']}) | {scan['old_s']:.1f} s | {scan['fused_s']:.1f} s |")
    return lines + [""] + [line for note in result.get("notes", []) for line in (note, "")]


def deterministic_section(result: dict) -> list[str]:
    m, tiny, demo = result["machine"], result["tiny"], result.get("demo")

    def each(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    def difference(figures):
        value = figures["max_weight_difference"]
        return "-" if value is None else f"{value:.2g}"
    lines = [f"### {m['cpu']}, {m['date']}", "",
             f"Python {m['python']}, torch {m['torch']}, default thread count ({m['threads']}); off and on "
             f"alternating, one run after the other; each figure is one run, pairs in order.", "",
             "| figure | off | on |", "|---|---|---|"]
    if demo:
        lines += [f"| the demo's training, whole `dbnb train` process ({demo['steps']} steps, batch 2 + prior "
                  f"preservation, text encoder trained, previews), seconds | {each(demo['off']['process_s'], '.1f')} "
                  f"| {each(demo['on']['process_s'], '.1f')} |",
                  f"| the same, steps/s after step {demo['warmup']} | {each(demo['off']['steps_per_s'], '.2f')} | "
                  f"{each(demo['on']['steps_per_s'], '.2f')} |",
                  f"| the demo, two runs of one config: max difference of the fp32 UNet weights | "
                  f"{difference(demo['off'])} | {difference(demo['on'])} |"]
    lines += [f"| tiny model, 64 px, batch 1, AdamW, fp32, text encoder trained, {tiny['steps']} steps: steps/s after step {tiny['warmup']} "
              f"| {each(tiny['off']['steps_per_s'], '.2f')} | {each(tiny['on']['steps_per_s'], '.2f')} |",
              f"| the tiny model, two runs of one config: max difference of the fp32 UNet weights | "
              f"{difference(tiny['off'])} | {difference(tiny['on'])} |"]
    return lines + [""] + [line for note in result.get("notes", []) for line in (note, "")]


def render(results: list[dict], cpu_results: list[dict] = ()) -> str:
    gpu_runs = [r for r in results if not r["machine"]["dry_run"]]
    lines = ["# Performance: dbnb on GPUs", "",
             "Written by `bench/gpu_suite.py` from the results files in `docs/gpu-results/`; do not edit by hand, "
             "run the suite again. Figures: SD 1.5's architecture with random weights (same shapes and cost as a "
             "real model), 512 px, batch 1 unless a profile says otherwise.", "", "## dbnb's figures", ""]
    if not gpu_runs:
        lines += ["**No GPU figures yet.** dbnb has not yet run on a GPU; this section fills in when "
                  "`python bench/gpu_suite.py` runs on one (see *How to run it*). Until then memory_profile=auto "
                  "rests on the published figures below.", ""]
    for result in results:
        lines += result_section(result)
    hot_path = [r for r in cpu_results if r.get("kind") not in ("deterministic", "plan")]
    planned = next((r for r in cpu_results if r.get("kind") == "plan"), None)
    deterministic = [r for r in cpu_results if r.get("kind") == "deterministic"]
    if hot_path:
        lines += ["## dbnb's CPU figures: the training step's hot path", "",
                  "Written by `bench/hot_path.py --record` from `docs/cpu-results/`; CPU timings say what changed "
                  "between two versions on one machine, not what a GPU does.", ""]
        for result in hot_path:
            lines += cpu_section(result)
    if deterministic:
        lines += ["## dbnb's CPU figures: deterministic=true (issue 36)", "",
                  "Written by `bench/bench_deterministic.py --record` from `docs/cpu-results/`.", ""]
        for result in deterministic:
            lines += deterministic_section(result)
    lines += published_section(planned) + auto_section(planned) + [HOW_TO_RUN]
    return "\n".join(lines)


def write_doc(folder: str | Path) -> Path:
    folder = Path(folder)
    results = [json.loads(p.read_text()) for p in sorted((folder / "gpu-results").glob("*.json"))]
    cpu_results = [json.loads(p.read_text()) for p in sorted((folder / "cpu-results").glob("*.json"))]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "performance.md"
    path.write_text(render(results, cpu_results), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_doc(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs"))
