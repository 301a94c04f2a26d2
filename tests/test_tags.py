"""caption_mode=tags: the WD14 tagger's contract, tag captions, core-tag pruning and the report.
The tagger is a tiny ONNX stand-in with the v3 contract (built here); nothing is downloaded."""
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dbnb.data.dataset import caption_for
from dbnb.prep import SegmenterError, Tagger, TaggerError, prepare_dataset, write_stand_in_tagger
from dbnb.prep.tagger import load_tagger, prepare
from dbnb.prep.tags import caption_tag, core_tags, frequency, is_core, tag_caption

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
# The stand-in's view tags (what the guide advises against) follow these colours.
YELLOW, CYAN, MAGENTA, BLACK = (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 0, 0)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    return Tagger({"model.onnx": (f := write_stand_in_tagger(tmp_path_factory.mktemp("wd14"), size=64)) / "model.onnx",
                   "selected_tags.csv": f / "selected_tags.csv"})


def picture(colour, share=1.0, size=64) -> Image.Image:
    """`share` of the rows in `colour`, the rest white: the stand-in's tags follow the mean colour."""
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).rectangle((0, 0, size - 1, round(size * share) - 1), fill=colour)
    return im


def prep(src, out, tagger, **kw):
    kw = {"remove_background": False, "face_detector": None, "resolution": 64, "caption_mode": "tags",
          "instance_token": "nanU", "class_token": "1girl", **kw}
    return prepare_dataset(src=src, out=out, progress=False, tagger=tagger, **kw)


def test_tagger_contract_white_square_bgr_and_the_models_own_size(tmp_path, tagger):
    assert tagger.size == 64  # read from the ONNX input shape [N, 64, 64, 3]
    assert load_tagger(str(write_stand_in_tagger(tmp_path / "v3"))).size == 448  # the v3 size
    cut = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    cut.putpixel((0, 0), (0, 0, 255, 0))  # transparent: white, not blue
    x = prepare(cut, 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32 and x.max() == 255.0
    assert list(x[32, 32]) == [0, 0, 255]  # red in BGR order
    assert list(x[2, 32]) == [255, 255, 255]  # padding above the 40x20 picture is white
    assert list(x[16, 0]) == [255, 255, 255]  # the transparent pixel
    red, blue = tagger.detect([picture(RED), picture(BLUE)], 0.35, 0.85)
    assert "red_hair" in red and "blue_eyes" not in red and "blue_eyes" in blue and "red_hair" not in blue
    assert "general" not in red and "sensitive" not in red  # ratings are never caption tags


def test_tag_captions_order_spaces_class_word_once_and_thresholds(tmp_path, tagger):
    src = tmp_path / "src"
    src.mkdir()
    picture(RED).save(src / "red.png")
    picture(RED, share=13 / 64).save(src / "some_red.png")  # the character tag at p ~ 0.89
    picture(BLUE).save(src / "blue.png")
    report = prep(src, tmp_path / "out", tagger, prune_core_tags=False)
    caps = {f.source: caption_for(report.out_dir / next(iter(f.outputs))) for f in report.files}
    # most certain first (ties in selected_tags.csv order); "1girl" is the class word, written once
    assert caps["red.png"] == r"nanU, 1girl, red hair, long hair, hanatsuki \(dbnb\), solo, smile"
    assert caps["blue.png"] == "nanU, 1girl, blue eyes, ^_^, solo, smile"  # a kaomoji keeps its underscore
    assert r"hanatsuki \(dbnb\)" in caps["some_red.png"]
    strict = prep(src, tmp_path / "strict", tagger, prune_core_tags=False, tag_threshold=0.6,
                  character_tag_threshold=0.95)
    caps = {f.source: caption_for(strict.out_dir / next(iter(f.outputs))) for f in strict.files}
    assert "smile" not in caps["red.png"] and "red hair" in caps["some_red.png"]
    assert "hanatsuki" not in caps["some_red.png"] and "hanatsuki" in caps["red.png"]
    no_class = prep(src, tmp_path / "nc", tagger, prune_core_tags=False, class_token="")
    assert [caption_for(p).split(", ").count("1girl") for p in no_class.images] == [1, 1, 1]


def test_core_tags_shared_by_most_pictures_are_pruned_and_reported(tmp_path, tagger):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        picture(RED, size=64 + 8 * i).save(src / f"red{i}.png")  # not duplicates
    picture(GREEN).save(src / "green.png")  # 4 of 5 red: 0.8 of the pictures
    report = prep(src, tmp_path / "out", tagger)
    assert report.tags["pruned"] == ["red hair", "long hair", r"hanatsuki \(dbnb\)"]
    assert report.tags["detected"]["solo"] == 5 and report.tags["detected"]["red hair"] == 4
    caps = {f.source: caption_for(report.out_dir / next(iter(f.outputs))) for f in report.files}
    assert caps["red0.png"] == "nanU, 1girl, solo, smile"  # 1girl and solo are not body traits: kept
    assert caps["green.png"] == "nanU, 1girl, school uniform, solo, smile"  # clothes are never pruned
    md = (report.out_dir / "report.md").read_text()
    assert "## Tags" in md and "| red hair | 4 | 80% | no (core tag) |" in md and "| solo | 5 | 100% | yes |" in md
    saved = json.loads((report.out_dir / "prep_report.json").read_text())
    assert saved["tags"]["pruned"] == report.tags["pruned"]
    assert saved["tag_frequency"] == {"1girl": 5, "nanU": 5, "smile": 5, "solo": 5, "school uniform": 1}
    assert "core tags" in report.summary()
    fewer = prep(src, tmp_path / "out2", tagger, core_tag_share=0.9)  # 0.8 < 0.9: nothing pruned
    assert fewer.tags["pruned"] == []
    assert "red hair" in caption_for(next(p for p in fewer.images if p.name.startswith("red0")))


def test_tags_are_reused_until_the_tagger_or_a_threshold_changes(tmp_path, tagger):
    calls = []

    class Counting:
        name, categories = tagger.name, tagger.categories

        def detect(self, images, general, character):
            calls.append(len(images))
            return tagger.detect(images, general, character)

    src = tmp_path / "src"
    src.mkdir()
    for i, c in enumerate((RED, GREEN, BLUE)):
        picture(c).save(src / f"p{i}.png")
    first = prep(src, tmp_path / "out", Counting())
    second = prep(src, tmp_path / "out", Counting())
    assert calls == [3] and {f.status for f in second.files} == {"unchanged"}
    assert [caption_for(p) for p in second.images] == [caption_for(p) for p in first.images]
    prep(src, tmp_path / "out", Counting(), tag_threshold=0.6)
    assert calls == [3, 3]


def test_the_guide_flags_back_views_a_lone_side_view_cut_off_bodies_and_close_ups(tmp_path, tagger):
    """The views come from the tagger's own tags (from_behind, from_side, head_out_of_frame,
    close-up), as the WD14 tagger gives them to users."""
    src = tmp_path / "src"
    src.mkdir()
    for name, colour in (("back", YELLOW), ("side", CYAN), ("body_only", MAGENTA), ("close", BLACK), ("front", RED)):
        picture(colour).save(src / f"{name}.png")
    report = prep(src, tmp_path / "out", tagger)
    guide = {f.source: f.guide for f in report.files}
    assert {s: [g.split(":")[0] for g in flags] for s, flags in guide.items()} == {
        "back.png": ["view from behind"], "side.png": ["the only side view"],
        "body_only.png": ["body only / cut off"], "close.png": ["face close-up"], "front.png": []}
    # the guide's reason, in English and in Japanese
    assert "remove it" in guide["back.png"][0] and "真後ろからの画像" in guide["back.png"][0]
    assert "or add more side views, left and right" in guide["side.png"][0] and "1枚だけ" in guide["side.png"][0]
    assert "絶対にNG" in guide["body_only.png"][0] and "head out of frame" in guide["body_only.png"][0]
    assert "down to the chest" in guide["close.png"][0] and "胸のあたりまで" in guide["close.png"][0]
    assert any(w.startswith("4 picture(s) the guide advises against: back.png (view from behind); body_only.png")
               for w in report.warnings)
    md = (report.out_dir / "report.md").read_text(encoding="utf-8")
    assert "## The guide on these pictures" in md and "- side.png: the only side view: " in md
    assert "guide: close.png: face close-up" in report.summary()
    saved = json.loads((report.out_dir / "prep_report.json").read_text(encoding="utf-8"))
    assert [f["guide"] for f in saved["files"]] == [guide[f["source"]] for f in saved["files"]]
    # A second side view (the guide: several, left and right, are fine): neither is flagged now,
    # though the first one's row is reused unchanged.
    picture(CYAN, size=72).save(src / "side_left.png")
    again = prep(src, tmp_path / "out", tagger)
    guide = {f.source: f.guide for f in again.files}
    assert guide["side.png"] == guide["side_left.png"] == [] and guide["back.png"]
    assert {f.source: f.status for f in again.files}["side.png"] == "unchanged"


def test_a_missing_tagger_stops_prep_before_any_picture(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = tmp_path / "src"
    src.mkdir()
    picture(RED).save(src / "a.png")
    with pytest.raises(TaggerError, match=r"tagger_model 'no/such-repo': cannot download model.onnx.*"
                                          r"tagger_model=/path/to/that/folder.*caption_mode=template"):
        prep(src, tmp_path / "out", None, tagger_model="no/such-repo")
    assert not (tmp_path / "out").exists()  # nothing was processed
    half = write_stand_in_tagger(tmp_path / "half")
    (half / "selected_tags.csv").unlink()
    with pytest.raises(TaggerError, match="folder without selected_tags.csv"):
        prep(src, tmp_path / "out", None, tagger_model=str(half))
    with pytest.raises(SegmenterError, match="segmentation_model 'no/seg'"):  # the segmenter too, before pictures
        prep(src, tmp_path / "out", None, tagger_model=str(half), caption_mode="template",
             remove_background=True, segmentation_model="no/seg")
    assert not (tmp_path / "out").exists()


def test_tag_text_rules():
    assert caption_tag("long_hair") == "long hair" and caption_tag("^_^") == "^_^" and caption_tag(">_<") == ">_<"
    assert caption_tag("hu_tao_(genshin_impact)") == r"hu tao \(genshin impact\)"
    assert tag_caption("nanU", "1girl", ["1girl", "solo", "nanU", "smile"]) == "nanU, 1girl, solo, smile"
    core = ["long hair", "pink hair", "blue eyes", "hair between eyes", "twintails", "animal ears", "ahoge",
            "large breasts", "fang", "cat tail"]
    not_core = ["closed eyes", "one eye closed", "looking at viewer", "hand in own hair", "school uniform",
                "hair ornament", "hair flower", "smile", "1girl", "solo", "holding hair", "floating hair"]
    assert [t for t in core if not is_core(t)] == [] and [t for t in not_core if is_core(t)] == []
    assert core_tags([["long hair", "smile"], ["long hair", "smile"], ["smile"]], 0.6) == ["long hair"]
    assert core_tags([["long hair"], ["smile"]], 0.6) == []
    assert frequency(["nanU, 1girl, smile", "nanU,  smile,smile"]) == {"nanU": 2, "smile": 2, "1girl": 1}
