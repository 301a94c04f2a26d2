"""The seed-format training report and the model card, from a real demo run."""
import json
import re
from pathlib import Path

import pytest
import yaml

from dbnb.core.config import load_config
from dbnb.ship.export import export
from dbnb.ship.report import USER_FIELD, model_card, write_report
from dbnb.world.demo import run_demo

# A demo run beside the session's world, whose class images are generated: slow, as the world is.
pytestmark = pytest.mark.slow
HEADINGS = ["DBモデルハッシュ", "学習対象", "使用素材", "加工", "加工後素材詳細", "正則化画像", "ベースモデル",
            "LR等のステータス設定", "モデルハッシュ", "ディスク", "安定した呼び出し方", "結果"]


@pytest.fixture(scope="module")
def demo_run(world_folder):
    """A 2-step demo run beside the session's world (its model and class images made once)."""
    return run_demo(world_folder, steps=2, score=False, run_name="report")["run_dir"]


def section(text, heading):
    part = text.split(f"## {heading} /")[1]
    return part.split("\n## ")[0]


def test_every_heading_is_filled_from_the_run(demo_run):
    text = write_report(demo_run).read_text(encoding="utf-8")
    config = load_config(demo_run / "config.json")
    for heading in HEADINGS:
        assert f"## {heading} /" in text
    # the guide's DBモデルハッシュ is the trainer's commit: the dbnb that started the run, as recorded
    from dbnb.core.versions import dbnb_version
    assert json.loads((demo_run / "config.json").read_text())["dbnb_version"] == dbnb_version()
    assert f"`{dbnb_version()}`" in section(text, "DBモデルハッシュ") and "dbnb 0." in dbnb_version()
    assert config.instance_prompt in section(text, "学習対象")
    assert "5 images" in section(text, "使用素材")
    assert f"{config.num_class_images} used of 50" in section(text, "正則化画像")
    assert f"学習画像の{config.num_class_images / 5:g}倍" in section(text, "正則化画像")  # the seed's 学習画像の10倍
    assert "generated with the base model from `girl`" in section(text, "正則化画像")
    assert config.pretrained_model_name_or_path in section(text, "ベースモデル")
    settings = section(text, "LR等のステータス設定")
    assert f"Learning Rate (`learning_rate`): {config.learning_rate:g} (preset: 1e-06)" in settings
    assert "Apply Horizontal Flip (`hflip`): OFF" in settings and "False" not in settings  # the seed's ON / OFF
    assert "trained 2 of 2 steps" in settings
    # the sizes measured in the run folder: 2 saves, the newest with its resume state (keep_last_n=1)
    assert re.search(r"2 checkpoint\(s\), [\d.]+ MiB of fp16 weights each; 1 resume state\(s\) of [\d.]+ MiB; "
                     r"the run folder holds [\d.]+ MiB", section(text, "ディスク")), section(text, "ディスク")
    # facts that do not exist yet are said to be missing, not invented
    assert "not exported yet" in section(text, "モデルハッシュ")
    assert "not scored yet" in section(text, "結果")
    assert "samples/step-000002/grid.png" in section(text, "結果")
    # what the user fills in is visible once rendered: a list line, never an HTML comment
    assert "<!--" not in text
    for heading in ("学習対象", "安定した呼び出し方", "結果"):
        assert f"\n- {USER_FIELD} " in section(text, heading), heading
    assert section(text, "学習対象").split("\n- ")[1].startswith(USER_FIELD)  # first: the character's name


def test_export_hash_and_scores_appear_once_they_exist(demo_run):
    exported = export(demo_run, overwrite=True)
    rec = {"checkpoint": "step-000002", "step": 2, "reason": "fidelity 0.9", "rule": "the rule"}
    (demo_run / "scores.json").write_text(json.dumps({"recommendation": rec, "rows": [
        {"checkpoint": "step-000002", "clip_i": 0.81, "dino": 0.7, "clip_t": 0.3}]}))
    try:
        text = write_report(demo_run).read_text(encoding="utf-8")
    finally:
        (demo_run / "scores.json").unlink()
    from dbnb.ship.hashes import short_hash
    assert f"`{short_hash(exported.path)}` {exported.path.name}" in section(text, "モデルハッシュ")
    assert short_hash(exported.path) not in section(text, "DBモデルハッシュ")  # the file's hash has its own heading
    assert "recommended checkpoint: **step-000002**" in section(text, "結果")
    assert "the instance prompt at step-000002" in section(text, "安定した呼び出し方")


def test_a_run_without_class_images_says_so(demo_run, tmp_path):
    config = load_config(demo_run / "config.json")
    other = tmp_path / "plain"
    other.mkdir()
    config.replace(with_prior_preservation=False, output_dir=str(tmp_path), run_name="plain").save(
        other / "config.json")
    text = write_report(other).read_text(encoding="utf-8")
    assert "none (prior preservation off)" in section(text, "正則化画像")
    assert "trained 0 of" in text
    # a config.json without the trainer's version (runs from before it was recorded) says so
    assert "not recorded" in section(text, "DBモデルハッシュ")


def test_model_card_is_yaml_front_matter_and_markdown(demo_run):
    exported = export(demo_run, overwrite=True)
    card = model_card(demo_run, exported.path).read_text(encoding="utf-8")
    assert card.startswith("---\n")
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["instance_prompt"] == "hnzk girl" and "dreambooth" in meta["tags"] and meta["license"]
    assert "base_model" not in meta  # a local path means nothing on the Hub
    # a base dbnb does not know the licence of: SD 1.x's, and what to do for one with its own
    assert meta["license"] == "creativeml-openrail-m" and "set `license` to the base's before publishing" in body
    assert exported.path.name in body and body.lstrip().startswith("# report")
    from dbnb.core.config import load_config
    base = load_config(demo_run / "config.json").pretrained_model_name_or_path
    assert base not in body and f"base model: `{Path(base).name}`" in body  # the card is shared: no local path
