"""Checkpoint scores (`dbnb score RUN_DIR`) with tiny random CLIP / DINO models built from configs,
loaded through the same `from_pretrained(folder)` path as the real ones."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_checkpoint_run
from PIL import Image, ImageOps

from dbnb.core.config import Config
from dbnb.evaluate.score import ScoreError, plot_scores, recommend, score_figure, score_run
from dbnb.evaluate.scorers.clip import COLUMNS, cosine, load_clip, load_dino, mean_similarity, paired_similarity
from dbnb.world.demo import draw_character

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


def _hand_written(images, size, mean, std) -> torch.Tensor:
    """What dbnb fed the models before transformers' processors did: centre square, bicubic,
    /255, the model's mean and std (kept here to show the processors give the same pixels)."""
    arrays = [np.asarray(ImageOps.fit(im.convert("RGB"), (size, size), Image.Resampling.BICUBIC),
                         dtype=np.float32) / 255.0 for im in images]
    batch = (np.stack(arrays) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def test_models_are_fed_as_their_model_cards_say_and_as_before(embedders):
    """What each model is fed equals what transformers' own processor makes of the picture, set up
    as the model cards' preprocessor_config.json is: CLIP's (OpenAI mean/std, shortest side,
    centre crop, bicubic) and DINO's (ImageNet mean/std, bicubic); and equals the hand-written
    preprocessing dbnb used before, wide pictures (centre square) and transparent ones included."""
    from transformers import CLIPImageProcessor, ViTImageProcessor
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    clip, dino = load_clip(str(embedders[0])), load_dino(str(embedders[1]))
    size = clip.size
    clip_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    dino_processor = ViTImageProcessor(size={"height": dino.size, "width": dino.size}, resample=3,
                                       image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
    square, wide = draw_character(0), _wide_picture()
    clear = square.convert("RGBA")
    clear.putalpha(Image.new("L", square.size, 0))  # fully clear: its colours are what is fed
    before = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
              "dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
    for model in (clip, dino):
        for images in ([square, square.convert("RGBA")], [wide], [clear]):
            torch.testing.assert_close(model.pixels(images), _hand_written(images, model.size, *before[model.kind]),
                                       atol=1e-5, rtol=0)
    with torch.no_grad():
        for images in ([square, square.convert("RGBA")], [wide]):  # ViT's processor squashes, so square only
            pixels = clip_processor(images, return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(clip.pixels(images), pixels, atol=1e-5, rtol=0)
            wanted = clip.model.get_image_features(pixel_values=pixels)
            wanted = wanted if isinstance(wanted, torch.Tensor) else wanted.pooler_output
            torch.testing.assert_close(clip.images(images), torch.nn.functional.normalize(wanted, dim=-1))
        pixels = dino_processor([square], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(dino.pixels([square]), pixels, atol=1e-5, rtol=0)
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


def test_plot_draws_each_score_at_its_step_on_a_scale_of_its_panel(tmp_path):
    from dbnb.evaluate.scorers.clip import PANELS

    rows = table((0, 0.5, 0.30), (250, 0.6, math.nan), (1000, 0.7, 0.25))
    for r, dino in zip(rows, (0.55, 0.65, 0.6)):
        r["dino"], r["fidelity"], r["class_clip_t"] = dino, (r["clip_i"] + dino) / 2, 0.28
    figure = score_figure(rows, recommended=250)
    fidelity, flexibility = figure.axes[:2]
    assert [fidelity.get_ylabel(), flexibility.get_ylabel()] == [p.ylabel for p in PANELS]
    assert flexibility.get_xlabel() == "training step"
    lines = {line.get_label(): line for ax in (fidelity, flexibility) for line in ax.get_lines()}
    assert list(lines["CLIP-I"].get_xdata()) == [0, 250, 1000] and list(lines["CLIP-I"].get_ydata()) == [0.5, 0.6, 0.7]
    assert list(lines["DINO"].get_ydata()) == [0.55, 0.65, 0.6]
    assert list(lines["CLIP-T (flexibility)"].get_xdata()) == [0, 1000]  # the NaN at step 250 is left out
    assert lines["CLIP-I"] in fidelity.get_lines() and lines["CLIP-T (flexibility)"] in flexibility.get_lines()
    # each panel its own y scale: CLIP-T's 0.05 spread is not flattened by fidelity's 0.2
    low, high = flexibility.get_ylim()
    assert low < 0.25 and high > 0.30 and high - low < 0.2
    assert fidelity.get_ylim()[0] < 0.5 < 0.7 < fidelity.get_ylim()[1]
    assert list(lines["recommended: step 250"].get_xdata()) == [250, 250]
    for ax in (fidelity, flexibility):  # every series is named in the panel's legend
        assert {t.get_text() for t in ax.get_legend().get_texts()} == {line.get_label() for line in ax.get_lines()}
    assert [t.get_text() for t in flexibility.get_xticklabels()] == ["base", "250", "1000"]
    image = Image.open(plot_scores(rows, tmp_path / "scores.png", recommended=250))
    assert image.size == (720, 520)


def _scores_by_hand(run_dir, embedders, data) -> dict[str, dict]:
    """The table's numbers straight from transformers (its own processors, models and tokenizer)
    and the images on disk, as the DreamBooth paper defines them: no dbnb.evaluate.score code."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, ViTModel
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    clip, dino = CLIPModel.from_pretrained(embedders[0]).eval(), ViTModel.from_pretrained(embedders[1]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(embedders[0])
    size = clip.config.vision_config.image_size
    clip_pixels = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # DINO on the centre square too, as CLIP (a ViT processor would squash the wide test image)
    dino_size = dino.config.image_size
    dino_pixels = CLIPImageProcessor(size={"shortest_edge": dino_size}, crop_size={"height": dino_size, "width": dino_size},
                                     image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)

    def unit(t):
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        return (t / t.norm(dim=-1, keepdim=True)).numpy()

    @torch.no_grad()
    def embed(images):
        return (unit(clip.get_image_features(**clip_pixels(images, return_tensors="pt"))),
                unit(dino(**dino_pixels(images, return_tensors="pt")).last_hidden_state[:, 0]))

    @torch.no_grad()
    def text(words):
        return unit(clip.get_text_features(**tokenizer([words], return_tensors="pt")))[0]

    config = json.loads((run_dir / "config.json").read_text())
    instance = [Image.open(p).convert("RGB") for p in sorted(Path(config["instance_data_dir"]).glob("*.png"))]
    inst_clip, inst_dino = embed(instance)
    table = {}
    for row in [r["checkpoint"] for r in data["rows"]]:
        def of(kind):
            pairs = [(p, s) for p in data["prompts"] if p["kind"] == kind for s in data["seeds"]]
            images = [Image.open(run_dir / "tests" / row / f"p{p['index']}-s{s}.png").convert("RGB") for p, s in pairs]
            return embed(images), [text(p["clip_text"]) for p, _ in pairs]
        (fid_clip, fid_dino), _ = of("fidelity")
        (flex_clip, _), flex_texts = of("flexibility")
        (class_clip, _), class_texts = of("class")
        clip_i, dino_i = float((fid_clip @ inst_clip.T).mean()), float((fid_dino @ inst_dino.T).mean())
        table[row] = dict(clip_i=clip_i, dino=dino_i, fidelity=(clip_i + dino_i) / 2,
                          clip_t=float(np.mean([a @ t for a, t in zip(flex_clip, flex_texts)])),
                          class_clip_t=float(np.mean([a @ t for a, t in zip(class_clip, class_texts)])),
                          class_clip_i=float((class_clip @ inst_clip.T).mean()))
    for r in table.values():
        r["drift"] = table["base"]["class_clip_t"] - r["class_clip_t"]
    return table


def test_score_run_writes_the_table_plot_and_recommendation(run_dir, embedders, capsys):
    overrides = [*FAST, f"clip_model={embedders[0]}", f"dino_model={embedders[1]}"]
    result = score_run(run_dir, overrides, progress=False)
    assert [r["checkpoint"] for r in result.rows] == ["base", "step-000001", "step-000002"]
    assert [r["step"] for r in result.rows] == [0, 1, 2]
    data = json.loads(result.json.read_text())
    assert {p["kind"] for p in data["prompts"]} == {"fidelity", "flexibility", "class"} and data["seeds"] == [0, 1]
    # test_wide (default 1.5): the fidelity prompt rendered wide too, 96x64 on the 64-px tiny model, and
    # scored with the other fidelity images (by hand below, too): a set that breaks wide pictures shows
    wide = data["prompts"][-1]
    assert (wide["kind"], wide["size"], wide["text"]) == ("fidelity", [96, 64], data["prompts"][0]["text"])
    for row in ("base", "step-000001", "step-000002"):
        assert Image.open(run_dir / "tests" / row / f"p{wide['index']}-s1.png").size == (96, 64)
    assert Image.open(run_dir / "tests" / f"grid-{wide['index']}.png").width > 2 * 96
    by_hand = _scores_by_hand(run_dir, embedders, data)
    for r in result.rows:
        for key, value in by_hand[r["checkpoint"]].items():
            assert r[key] == pytest.approx(value, abs=1e-5), (r["checkpoint"], key)
    # The recommendation follows from those numbers: with no flexibility to spare, the trained
    # checkpoint with the best CLIP-T; with any amount, the most faithful one.
    trained = {r["checkpoint"]: r for r in result.rows[1:]}
    def picked(tolerance):
        return score_run(run_dir, [*overrides, f"flexibility_tolerance={tolerance}"], progress=False).recommendation
    assert picked(0.0)["checkpoint"] == max(trained, key=lambda c: by_hand[c]["clip_t"])
    assert picked(2.0)["checkpoint"] == max(trained, key=lambda c: by_hand[c]["fidelity"])
    rec, tolerance = result.recommendation, Config().flexibility_tolerance
    best = max(by_hand[c]["clip_t"] for c in trained)
    within = [c for c in trained if by_hand[c]["clip_t"] >= best - tolerance]
    assert rec["checkpoint"] == max(within, key=lambda c: by_hand[c]["fidelity"]) and rec["tolerance"] == tolerance
    with open(result.csv, newline="") as f:
        saved = list(csv.DictReader(f))
    assert list(saved[0]) == list(COLUMNS) and [r["step"] for r in saved] == ["0", "1", "2"]
    assert [float(r["clip_t"]) for r in saved] == pytest.approx([by_hand[c]["clip_t"] for c in by_hand], abs=1e-5)
    assert data["recommendation"]["step"] == rec["step"] and data["rows"][1]["step"] == 1
    assert Image.open(result.plot).size == (720, 520)
    page = result.html.read_text(encoding="utf-8")
    assert f"Recommended: step {rec['step']}" in page and "../scores.png" in page
    printed = capsys.readouterr().out
    assert f"recommended checkpoint: {rec['checkpoint']}" in printed and "rule:" in printed and "clip_i" in printed
    # the test images were made once; scoring again reuses them and gives the same numbers
    again = score_run(run_dir, overrides, progress=False)
    assert again.rows == result.rows


def test_a_scorer_model_that_cannot_load_stops_before_the_first_test_image(run_dir, embedders, tmp_path):
    """Notebook 05 on Colab: a DINO it cannot load is said at once, not after minutes of images."""
    before = sorted((run_dir / "tests").rglob("*.png")) if (run_dir / "tests").exists() else []
    with pytest.raises(ScoreError, match="dino_model"):
        score_run(run_dir, [*FAST, "test_seeds=3", f"clip_model={embedders[0]}",
                            f"dino_model={tmp_path / 'missing'}"], progress=False)
    after = sorted((run_dir / "tests").rglob("*.png")) if (run_dir / "tests").exists() else []
    assert after == before


def test_score_run_needs_a_fidelity_prompt(run_dir):
    with pytest.raises(ScoreError, match="test_fidelity_prompts"):
        score_run(run_dir, ["test_fidelity_prompts=[]"], progress=False)


def test_score_run_with_ccip_and_tag_adherence(run_dir, tmp_path, monkeypatch):
    from dbnb.evaluate.scorers.ccip import COLUMNS as CCIP_COLUMNS
    from dbnb.evaluate.scorers.ccip import WEIGHED as CCIP_WEIGHED
    from dbnb.evaluate.scorers.ccip import CCIPError, write_stand_in_ccip
    from dbnb.prep.tagger import write_stand_in_tagger

    ccip, wd14 = write_stand_in_ccip(tmp_path / "ccip", size=64), write_stand_in_tagger(tmp_path / "wd14", size=64)
    overrides = [*FAST, "score_with=ccip", f"ccip_model={ccip}", f"tagger_model={wd14}",
                 "test_flexibility_prompts=['{instance_prompt}, 1girl, solo, school uniform']"]
    result = score_run(run_dir, overrides, progress=False)
    assert [r["checkpoint"] for r in result.rows] == ["base", "step-000001", "step-000002"]
    for r in result.rows:
        assert 0.0 <= r["ccip"] <= 1.0 and r["ccip_difference"] >= 0.0 and 0.0 <= r["tag_adherence"] <= 1.0
        assert 0.0 <= r["class_ccip"] <= 1.0
    assert result.recommendation == recommend(result.rows, Config().flexibility_tolerance, CCIP_WEIGHED)
    with open(result.csv, newline="") as f:
        assert list(next(csv.DictReader(f))) == list(CCIP_COLUMNS)
    assert json.loads(result.json.read_text())["score_with"] == "ccip"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CCIPError, match="ccip_model 'no/such-ccip'"):
        score_run(run_dir, [*overrides, "ccip_model=no/such-ccip", "test_seeds=3"], progress=False)
    assert not list(run_dir.rglob("*-s2.png"))  # refused before any test image was made
