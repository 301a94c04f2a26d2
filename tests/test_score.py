"""Checkpoint scores (`dbnb score RUN_DIR`) with tiny random CLIP / DINO models built from configs,
loaded through the same `from_pretrained(folder)` path as the real ones."""
import csv
import json
import math

import pytest
import torch
from conftest import two_checkpoint_run
from PIL import Image

from dbnb.config import Config
from dbnb.demo import draw_character
from dbnb.score import (COLUMNS, ScoreError, cosine, load_clip, load_dino, mean_similarity, paired_similarity,
                        plot_scores, preprocess, recommend, score_run)

FAST = ["test_seeds=2", "test_infer_steps=2", "test_flexibility_prompts=['{instance_prompt}, 1girl, swimsuit']"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    return two_checkpoint_run(tiny_dir, tmp_path_factory.mktemp("score"))


def test_preprocess_normalizes_like_the_models_processors():
    mean, std = (0.5, 0.25, 0.75), (0.5, 0.5, 0.25)
    grey = Image.new("RGB", (100, 60), (128, 64, 191))
    batch = preprocess([grey, grey.convert("RGBA")], 32, mean, std)
    assert batch.shape == (2, 3, 32, 32)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.5, (64 / 255 - 0.25) / 0.5, (191 / 255 - 0.75) / 0.25])
    assert torch.allclose(batch[:, :, 5, 5], expected.expand(2, 3), atol=1e-5)


def test_identical_images_score_one_and_all_scores_are_cosines(embedders):
    clip, dino = load_clip(str(embedders[0])), load_dino(str(embedders[1]))
    images = [draw_character(i) for i in range(3)] + [Image.new("RGB", (64, 64), "white")]
    for model in (clip, dino):
        emb = model.images(images)
        assert emb.shape[0] == 4 and torch.isfinite(emb).all()
        sims = cosine(emb, emb)
        assert torch.allclose(sims.diagonal(), torch.ones(4), atol=1e-5)
        assert (sims >= -1).all() and (sims <= 1).all()
        assert mean_similarity(model.images(images[:1]), model.images(images[:1])) == pytest.approx(1.0, abs=1e-5)
        assert -1.0 <= mean_similarity(emb[:2], emb[2:]) <= 1.0
    texts = clip.texts(["girl, 1girl, solo, swimsuit", "a cat"] * 2)
    assert texts.shape == (4, 16) and torch.isfinite(texts).all()
    assert -1.0 <= paired_similarity(clip.images(images), texts) <= 1.0
    assert paired_similarity(texts, texts) == pytest.approx(1.0, abs=1e-5)


def test_loading_errors_name_the_setting(tmp_path):
    with pytest.raises(ScoreError, match="clip_model: cannot load .*clip_model=/path"):
        load_clip(str(tmp_path / "missing"))
    with pytest.raises(ScoreError, match="dino_model"):
        load_dino(str(tmp_path / "missing"))


def table(*rows):
    """Made-up scores: (step, fidelity, clip_t); step 0 is the base model."""
    return [dict(checkpoint="base" if s == 0 else f"step-{s:06d}", step=s, clip_i=f, dino=f, fidelity=f, clip_t=t,
                 class_clip_t=0.3, drift=0.0, class_clip_i=0.5) for s, f, t in rows]


def test_recommendation_is_the_most_faithful_checkpoint_within_the_flexibility_tolerance():
    rows = table((0, 0.99, 0.40),  # the base model scores best on both, and is never recommended
                 (500, 0.70, 0.300), (1000, 0.75, 0.295), (1500, 0.80, 0.270), (2000, 0.82, 0.250))
    assert recommend(rows, 0.01)["step"] == 1000   # 500 and 1000 are within 0.01 of 0.300
    assert recommend(rows, 0.0)["step"] == 500     # only the most flexible one
    assert recommend(rows, 0.03)["step"] == 1500   # 0.270 is exactly 0.03 below the best: within
    assert recommend(rows, 1.0)["step"] == 2000    # flexibility does not matter: most faithful
    rec = recommend(rows, 0.01)
    assert "within flexibility_tolerance=0.01 of the best trained checkpoint" in rec["rule"]
    assert rec["best_clip_t"] == 0.300 and rec["checkpoint"] == "step-001000"
    assert recommend(table((500, 0.8, 0.3), (1000, 0.8, 0.3)), 0.01)["step"] == 500  # tie: the earlier step
    no_flex = recommend(table((500, 0.7, math.nan), (1000, 0.9, math.nan)), 0.01)
    assert no_flex["step"] == 1000 and "no flexibility prompts" in no_flex["rule"]
    with pytest.raises(ScoreError, match="No trained checkpoint"):
        recommend(table((0, 0.9, 0.3)), 0.01)


def test_plot_draws_scores_against_step_even_with_gaps(tmp_path):
    rows = table((0, 0.5, 0.3), (500, 0.6, math.nan), (1000, 0.7, 0.25))
    path = plot_scores(rows, tmp_path / "scores.png", recommended=1000)
    image = Image.open(path)
    assert image.size == (720, 520)
    assert len(image.convert("RGB").getcolors(1 << 16)) > 5  # axes, labels and coloured series were drawn


def test_score_run_writes_the_table_plot_and_recommendation(run_dir, embedders, capsys):
    overrides = [*FAST, f"clip_model={embedders[0]}", f"dino_model={embedders[1]}"]
    result = score_run(run_dir, overrides, progress=False)
    assert [r["checkpoint"] for r in result.rows] == ["base", "step-000001", "step-000002"]
    for r in result.rows:
        for key in ("clip_i", "dino", "fidelity", "clip_t", "class_clip_t", "class_clip_i"):
            assert math.isfinite(r[key]) and -1.0 <= r[key] <= 1.0, (r["checkpoint"], key, r[key])
        assert r["drift"] == pytest.approx(result.rows[0]["class_clip_t"] - r["class_clip_t"])
    assert result.rows[0]["drift"] == 0.0
    assert result.recommendation == recommend(result.rows, Config().flexibility_tolerance)
    assert result.recommendation["step"] in (1, 2)
    with open(result.csv, newline="") as f:
        saved = list(csv.DictReader(f))
    assert list(saved[0]) == list(COLUMNS) and [r["step"] for r in saved] == ["0", "1", "2"]
    data = json.loads(result.json.read_text())
    assert data["recommendation"]["step"] == result.recommendation["step"] and data["rows"][1]["step"] == 1
    assert Image.open(result.plot).size == (720, 520)
    page = result.html.read_text(encoding="utf-8")
    assert "Recommended: step" in page and "../scores.png" in page
    printed = capsys.readouterr().out
    assert "recommended checkpoint:" in printed and "rule:" in printed and "clip_i" in printed
    # the test images were made once; scoring again reuses them and gives the same numbers
    again = score_run(run_dir, overrides, progress=False)
    assert again.rows == result.rows


def test_score_run_needs_a_fidelity_prompt(run_dir):
    with pytest.raises(ScoreError, match="test_fidelity_prompts"):
        score_run(run_dir, ["test_fidelity_prompts=[]"], progress=False)


def test_score_run_with_ccip_and_tag_adherence(run_dir, tmp_path, monkeypatch):
    from dbnb.ccip import CCIPError, write_stand_in_ccip
    from dbnb.prep.tagger import write_stand_in_tagger
    from dbnb.score import CCIP_COLUMNS, CCIP_SCORES

    ccip, wd14 = write_stand_in_ccip(tmp_path / "ccip", size=64), write_stand_in_tagger(tmp_path / "wd14", size=64)
    overrides = [*FAST, "score_with=ccip", f"ccip_model={ccip}", f"tagger_model={wd14}",
                 "test_flexibility_prompts=['{instance_prompt}, 1girl, solo, school uniform']"]
    result = score_run(run_dir, overrides, progress=False)
    assert [r["checkpoint"] for r in result.rows] == ["base", "step-000001", "step-000002"]
    for r in result.rows:
        assert 0.0 <= r["ccip"] <= 1.0 and r["ccip_difference"] >= 0.0 and 0.0 <= r["tag_adherence"] <= 1.0
        assert 0.0 <= r["class_ccip"] <= 1.0
    assert result.recommendation == recommend(result.rows, Config().flexibility_tolerance, CCIP_SCORES)
    with open(result.csv, newline="") as f:
        assert list(next(csv.DictReader(f))) == list(CCIP_COLUMNS)
    assert json.loads(result.json.read_text())["score_with"] == "ccip"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CCIPError, match="ccip_model 'no/such-ccip'"):
        score_run(run_dir, [*overrides, "ccip_model=no/such-ccip", "test_seeds=3"], progress=False)
    assert not list(run_dir.rglob("*-s2.png"))  # refused before any test image was made
