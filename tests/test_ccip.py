"""score_with=ccip: deepghs' CCIP contract and fidelity, and tag adherence, with tiny ONNX
stand-ins of the same contracts (built here; nothing downloaded)."""
import math
import random

import numpy as np
import pytest
from PIL import Image

from dbnb.core.config import Config
from dbnb.evaluate.scorers import world
from dbnb.evaluate.scorers.ccip import (CCIP, CCIPError, asked_tags, fidelity, load_ccip, prepare, tag_adherence,
                                        write_stand_in_ccip)
from dbnb.prep.tagger import load_tagger, write_stand_in_tagger

OTHER = world.Character(hair="blue", left="red", right="blue", coil="right")


@pytest.fixture(scope="module")
def ccip(tmp_path_factory):
    return load_ccip(str(write_stand_in_ccip(tmp_path_factory.mktemp("ccip"), size=64)))


def pictures(character, n, seed=0):
    return [world.draw(world.pose(character, random.Random(seed + i)), 64) for i in range(n)]


def test_ccip_contract_rgb_on_white_squeezed_and_clip_normalised(tmp_path, ccip):
    assert ccip.size == 64 and ccip.threshold == 0.1  # the input size from the ONNX shape, the threshold from metrics.json
    assert load_ccip(str(write_stand_in_ccip(tmp_path / "full"))).size == 384
    im = Image.new("RGBA", (100, 50), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    x = prepare(im, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    red = (np.array([1.0, 0.0, 0.0]) - np.array([0.48145466, 0.4578275, 0.40821073])) / \
        np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(x[:, 32, 32], red, rtol=1e-5)  # the whole picture squeezed: no white bands
    white = (1.0 - 0.48145466) / 0.26862954
    assert x[0, 0, 0] == pytest.approx(white, rel=0.05)  # the transparent corner is white, not black


def test_fidelity_is_one_for_identical_pictures_and_lower_for_another_character(ccip):
    hero = ccip.features(pictures(world.HERO, 4))
    same, diff = fidelity(ccip, hero[:1].repeat(2, 0), hero[:1])
    assert same == 1.0 and diff == pytest.approx(0.0, abs=1e-5)
    poses, poses_diff = fidelity(ccip, hero[1:], hero[:1])  # the same character in other poses
    other, other_diff = fidelity(ccip, ccip.features(pictures(OTHER, 3, seed=1)), hero[:1])  # the same poses
    print(f"stand-in CCIP vs the hero: identical {same:.2f} ({diff:.4f}), other poses {poses:.2f} ({poses_diff:.4f}), "
          f"another character {other:.2f} ({other_diff:.4f})")
    assert other < same and other_diff > ccip.threshold and other_diff > poses_diff
    assert math.isnan(fidelity(ccip, hero[:0], hero)[0])


def test_missing_ccip_model_names_the_setting_and_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CCIPError, match=r"ccip_model 'deepghs/ccip_onnx': cannot download "
                                        r"ccip-caformer-24-randaug-pruned/model_feat.onnx.*ccip_model=/path/to"):
        load_ccip("deepghs/ccip_onnx")
    folder = write_stand_in_ccip(tmp_path / "m")
    (folder / "metrics.json").unlink()
    with pytest.raises(CCIPError, match="folder without metrics.json"):
        load_ccip(str(folder))
    assert isinstance(CCIP, type)


def test_tag_adherence_counts_the_asked_for_tags_found(tmp_path):
    tagger = load_tagger(str(write_stand_in_tagger(tmp_path / "wd14", size=64)))
    fid = ["nanU, 1girl, solo"]
    assert asked_tags("nanU, 1girl, solo, school uniform, classroom", fid, tagger.categories) == ["school_uniform"]
    assert asked_tags("nanU, 1girl, solo, Red Hair", fid, tagger.categories) == ["red_hair"]
    assert asked_tags("nanU, 1girl, solo", fid, tagger.categories) == []
    green, red = Image.new("RGB", (64, 64), (0, 255, 0)), Image.new("RGB", (64, 64), (255, 0, 0))
    cfg = Config()
    prompt = "nanU, 1girl, solo, school uniform"
    assert tag_adherence(tagger, [(prompt, green), (prompt, green)], fid, cfg) == 1.0
    assert tag_adherence(tagger, [(prompt, green), (prompt, red)], fid, cfg) == 0.5
    assert math.isnan(tag_adherence(tagger, [("nanU, 1girl, solo", green)], fid, cfg))
