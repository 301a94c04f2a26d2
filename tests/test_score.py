"""Checkpoint scores (`dbnb score RUN_DIR`) with tiny random CLIP / DINO models built from configs,
loaded through the same `from_pretrained(folder)` path as the real ones."""
import csv
import json
import math

import numpy as np
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


def _wide_picture() -> Image.Image:
    """The demo character in the middle of a wider canvas of noise: the centre square is what counts."""
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (64, 128, 3), dtype=np.uint8))
    wide.paste(draw_character(0), (32, 0))
    return wide


def test_preprocess_normalizes_like_the_models_processors(embedders):
    """What each model is fed equals what transformers' own processor makes of the picture, set up
    as the model cards' preprocessor_config.json is: CLIP's (OpenAI mean/std, shortest side,
    centre crop, bicubic) and DINO's (ImageNet mean/std, bicubic)."""
    from transformers import CLIPImageProcessor, ViTImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    clip, dino = load_clip(str(embedders[0])), load_dino(str(embedders[1]))
    size = clip.size
    clip_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    dino_processor = ViTImageProcessor(size={"height": dino.size, "width": dino.size}, resample=3,
                                       image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    square, wide = draw_character(0), _wide_picture()
    with torch.no_grad():
        for images in ([square, square.convert("RGBA")], [wide]):  # ViT's processor squashes, so square only
            pixels = clip_processor(images, return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(preprocess(images, clip.size, clip.mean, clip.std), pixels, atol=1e-5, rtol=0)
            wanted = clip.model.get_image_features(pixel_values=pixels)
            wanted = wanted if isinstance(wanted, torch.Tensor) else wanted.pooler_output
            torch.testing.assert_close(clip.images(images), torch.nn.functional.normalize(wanted, dim=-1))
        pixels = dino_processor([square], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(preprocess([square], dino.size, dino.mean, dino.std), pixels, atol=1e-5, rtol=0)
        wanted = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
        torch.testing.assert_close(dino.images([square]), torch.nn.functional.normalize(wanted, dim=-1))


def test_identical_images_score_one_and_different_ones_lower(embedders):
    clip, dino = load_clip(str(embedders[0])), load_dino(str(embedders[1]))
    picture = draw_character(0)
    # The same picture in ways the score must ignore: its size, a mode with transparency or a
    # palette, and what lies outside the centre square.
    same = [picture.resize((128, 128), Image.Resampling.NEAREST), picture.convert("RGBA"),
            picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=255), _wide_picture()]
    different = [draw_character(1), picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                 Image.new("RGB", (64, 64), "white")]
    for model in (clip, dino):
        reference = model.images([picture])
        to_same = cosine(reference, model.images(same))[0]
        to_different = cosine(reference, model.images(different))[0]
        assert (to_same > 1 - 1e-4).all(), (model.kind, to_same)
        assert to_different.max() < to_same.min(), (model.kind, to_same, to_different)
        assert mean_similarity(reference, model.images(same)) == pytest.approx(1.0, abs=1e-4)
    # CLIP-I is the mean over all pairs; CLIP-T pairs image i with text i only.
    images, texts = clip.images(different), clip.texts(["girl, 1girl, solo, swimsuit", "a cat", "a white wall"])
    a, b = images.numpy(), texts.numpy()
    by_hand = a @ b.T / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    assert mean_similarity(images, texts) == pytest.approx(by_hand.mean(), abs=1e-6)
    assert paired_similarity(images, texts) == pytest.approx(np.diag(by_hand).mean(), abs=1e-6)
    assert abs(by_hand.mean() - np.diag(by_hand).mean()) > 1e-4  # the two rules give different numbers here
    # a text embeds the same alone or padded in a batch with longer ones
    torch.testing.assert_close(clip.texts(["a cat"])[0], texts[1], atol=1e-5, rtol=0)
    assert not torch.allclose(texts[0], texts[1], atol=1e-3)


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
