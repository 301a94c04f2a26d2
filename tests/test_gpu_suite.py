"""bench/gpu_suite.py cannot rot: its dry run (the tiny model on the CPU) runs every code path the
GPU run takes, and docs/performance.md is what its results files render to."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.py"


def run_suite(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def report_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_report
    finally:
        sys.path.pop(0)
    return gpu_report


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-suite")
    done = run_suite("--dry-run", "--cache", str(folder / "cache"), "--out", str(folder / "docs"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((folder / "docs" / "gpu-results" / "dry-run-cpu.json").read_text())
    return folder / "docs", results, done.stdout


@pytest.mark.slow  # the dry run trains every profile in its own process
def test_dry_run_trains_every_profile_it_can_and_says_why_not_the_others(dry_run):
    _, results, _ = dry_run
    rows = {r["id"]: r for r in results["profiles"]}
    assert len(rows) >= 6 and sorted(rows) == list(range(1, 12))
    for number in (1, 2, 4, 5, 6, 7, 9, 10, 11):
        row = rows[number]
        assert row["status"] == "ok", row
        assert math.isfinite(row["steps_per_s"]) and row["steps_per_s"] > 0
        assert row["loss_finite"] is True and row["steps"] == results["plan"]["steps"]
        # the planner's prediction beside what was measured: the first GPU run calibrates it
        assert row["predicted_allocated_gib"] > 0 and row["predicted_vram_gib"] > row["predicted_allocated_gib"]
    assert rows[6]["settings"]["with_prior_preservation"] is True
    assert rows[9]["settings"]["optimizer_in_backward"] is True
    assert (rows[7]["settings"]["use_lora"], rows[7]["settings"]["lora_conv_rank"]) == (True, 16)
    # SDXL as auto tiers it: LoRA for a T4, the UNet whole (bf16) for a 40 GB card, on the tiny SDXL here
    assert rows[10]["settings"]["use_lora"] is True and rows[11]["settings"]["mixed_precision"] == "bf16"
    assert "profiles 10-11: the tiny SDXL" in results["plan"]["model"]
    printed = [line for line in dry_run[2].splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(printed) >= 6 and any(line.startswith("| 7 | LoRA") for line in printed)
    assert rows[8]["status"] == "skipped" and "CUDA" in rows[8]["reason"]
    # Without 8-bit Adam (CUDA only) profile 3 would repeat profile 1.
    assert rows[3] == {"id": 3, "name": rows[3]["name"], "status": "skipped",
                       "reason": "needs CUDA: on a CPU it is profile 1"}


@pytest.mark.slow  # the dry run trains every profile in its own process
def test_dry_run_extras(dry_run):
    _, results, _ = dry_run
    extras = results["extras"]
    assert extras["classimages"]["status"] == "ok" and extras["classimages"]["images_per_s"] > 0
    assert extras["preview"]["status"] == "ok", extras["preview"]
    assert extras["export"]["status"] == "ok" and extras["export"]["size_gib"] > 0
    assert extras["load"]["status"] == "ok" and extras["load"]["params_m"] > 0
    # profile 7's LoRA merged into the base model: a full single file, as large as profile 1's export
    assert extras["bake"]["status"] == "ok", extras["bake"]
    assert extras["bake"]["size_gib"] == pytest.approx(extras["export"]["size_gib"], rel=0.01)
    assert extras["hf"]["status"] == "skipped"
    # Two fresh processes of profile 1 with deterministic=true, compared bitwise.
    det = extras["deterministic"]
    assert det["status"] == "ok", det
    assert det["tensors"] > 100 and det["differing"] == 0 and det["max_abs_diff"] == 0 and det["steps_per_s"] > 0


@pytest.mark.slow  # the dry run trains every profile in its own process
def test_the_doc_is_rendered_from_the_results_file(dry_run, tmp_path):
    docs, results, _ = dry_run
    doc = (docs / "performance.md").read_text()
    assert "No GPU figures yet" in doc and "dry run" in doc
    for row in results["profiles"]:
        if row["status"] == "ok":
            assert f"| {row['id']} | {row['name']} | ok | {row['steps_per_s']:.2f} |" in doc
    assert "| 7 | LoRA rank 32 (+ conv rank 16) | ok |" in doc
    assert "| deterministic=true, two runs compared | ok | two runs of profile 1 with deterministic=true: bitwise equal;" in doc
    # A changed results file changes the doc: nothing in it is written by hand.
    (tmp_path / "gpu-results").mkdir()
    results["profiles"][0]["steps_per_s"] = 123.456
    (tmp_path / "gpu-results" / "x.json").write_text(json.dumps(results))
    done = run_suite("--write-doc", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 1 | T4 profile" in (text := (tmp_path / "performance.md").read_text()) and "| 123.46 |" in text


def test_committed_doc_is_what_the_committed_results_render_to():
    report = report_module()
    docs = ROOT / "docs"
    results = [json.loads(p.read_text()) for p in sorted((docs / "gpu-results").glob("*.json"))]
    cpu_results = [json.loads(p.read_text()) for p in sorted((docs / "cpu-results").glob("*.json"))]
    assert (docs / "performance.md").read_text(encoding="utf-8") == report.render(results, cpu_results)


def test_gpu_results_render_with_fits_and_the_t4_meaning(dry_run):
    """A GPU result (the dry run's, given VRAM figures) gets the fit columns and the T4 paragraph."""
    report = report_module()
    _, results, _ = dry_run
    gpu = json.loads(json.dumps(results))
    gpu["machine"].update(dry_run=False, gpu="Tesla T4", vram_gib=14.74)
    for row in gpu["profiles"]:
        if row["status"] == "ok":
            row.update(vram_allocated_gib=9.0, vram_reserved_gib=10.0, need_gib=10.5,
                       fits={"T4 15 GB": True, "12 GB card": True})
    gpu["profiles"][1].update(need_gib=15.5, fits={"T4 15 GB": False, "12 GB card": False})
    text = report.render([gpu])
    assert "No GPU figures yet" not in text and "### Tesla T4, 14.7 GiB" in text
    assert "| 2 | 1 without gradient checkpointing | ok |" in text and "| 15.50 | **no** | **no** |" in text
    assert "**For a Colab T4 user:** of the profiles that ran, 1, 4, 5, 6, 7, 9, 10, 11 fit" in text
    assert "x of profile 1" in text  # profile 9 is compared with profile 1


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed here")
def test_a_gpu_run_names_the_missing_packages_first():
    done = run_suite(timeout=60)
    assert done.returncode != 0
    assert "missing packages: bitsandbytes" in done.stderr and "Traceback" not in done.stderr


def test_an_only_run_adds_to_the_days_table(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_suite import merge
    finally:
        sys.path.pop(0)
    first = {"profiles": [{"id": 1, "status": "ok"}, {"id": 2, "status": "failed"}], "extras": {"load": {}},
             "seconds": 10}
    second = {"profiles": [{"id": 2, "status": "ok"}, {"id": 6, "status": "ok"}], "extras": {"classimages": {}},
              "seconds": 5, "machine": {}}
    merged = merge(first, second)
    assert [(r["id"], r["status"]) for r in merged["profiles"]] == [(1, "ok"), (2, "ok"), (6, "ok")]
    assert list(merged["extras"]) == ["classimages", "load"] and merged["seconds"] == 15


def test_only_rejects_unknown_names():
    done = run_suite("--dry-run", "--only", "1,12,bogus", timeout=60)
    assert done.returncode != 0 and "unknown 12, bogus" in done.stderr
