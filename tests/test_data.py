import numpy as np
import pytest
import torch
from PIL import Image

from dbnb.data import dataset as data
from dbnb.data.dataset import DatasetError, Example, build_prompt, caption_for, load_rgb
from dbnb.family.sd1.skeleton import SKELETON


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77)


def test_caption_from_txt_never_from_the_file_name(tmp_path):
    (tmp_path / "a.png").touch()
    (tmp_path / "a.txt").write_text("1girl,  smile\n")
    assert caption_for(tmp_path / "a.png") == "1girl, smile"
    assert caption_for(tmp_path / "img_0001.png") == ""  # "img" is no caption


def _pictures(folder, names, captions=()):
    folder.mkdir()
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)
    for name, text in captions:
        (folder / name).write_text(text)
    return folder


def test_filewords_without_captions_is_an_error_naming_the_pictures(tmp_path):
    folder = _pictures(tmp_path / "inst", ["img.png", "b.png", "c.png"], [("b.txt", "1girl, smile")])
    concept = data.Concept(str(folder), "[filewords]")
    with pytest.raises(DatasetError, match=r"2 of 3 pictures in instance_data_dir .* have no caption .* "
                                           r"uses \[filewords\]: c.png, img.png.*instance_token"):
        data.examples_for([concept], with_class=False)
    # with the token set, those pictures train on the token alone, and say so
    with pytest.warns(UserWarning, match=r"2 of 3 .* train on instance_token 'nanU' alone \(c.png, img.png\)"):
        instance, _ = data.examples_for([data.Concept(str(folder), "[filewords]", instance_token="nanU")], False)
    assert [e.prompt for e in instance] == ["nanU 1girl, smile", "nanU", "nanU"]
    # class pictures fall back on class_token the same way
    klass = _pictures(tmp_path / "class", ["k.png"])
    concept = data.Concept(str(folder), "[filewords]", str(klass), "[filewords]", "nanU", "1girl")
    with pytest.warns(UserWarning, match="class_token '1girl' alone"):
        _, class_examples = data.examples_for([concept], True)
    assert [e.prompt for e in class_examples] == ["1girl"]
    with pytest.raises(DatasetError, match="class_data_dir .* set class_token"):
        data.examples_for([data.Concept(str(folder), "x", str(klass), "[filewords]")], True)


@pytest.mark.parametrize("caption, template, expected", [
    ("1girl, smile", "[filewords]", "nanU 1girl, smile"),                 # token before the class word
    ("smile, 1girl", "[filewords]", "smile, nanU 1girl"),
    ("smile, white background", "[filewords]", "nanU smile, white background"),  # no class word: in front
    ("nanU 1girl, smile", "[filewords]", "nanU 1girl, smile"),            # already there: unchanged
    ("1girl, smile", "masterpiece, [filewords]", "masterpiece, nanU 1girl, smile"),
    ("1girl, smile", "nanU Unan", "nanU Unan"),                            # no [filewords]: template as is
])
def test_filewords_for_instance_images(tmp_path, caption, template, expected):
    (tmp_path / "x.png").touch()
    (tmp_path / "x.txt").write_text(caption)
    assert build_prompt(template, tmp_path / "x.png", "nanU", "1girl") == expected


def test_filewords_for_class_images_drop_the_instance_token(tmp_path):
    (tmp_path / "x.png").touch()
    (tmp_path / "x.txt").write_text("nanU 1girl, smile")
    assert build_prompt("[filewords]", tmp_path / "x.png", "nanU", "1girl", is_class=True) == "1girl, smile"


def test_long_prompts_are_cut_and_collected_for_one_warning(tokenizer, tmp_path):
    long, cut = ", ".join(["pink hair"] * 60), []
    ids = data.tokenize(tokenizer, [Example(tmp_path / "long.png", long), Example(tmp_path / "short.png", "a")], cut)
    assert ids.shape == (2, 77) and ids[0, -1].item() == 49407
    assert [(ex.path.name, tokens) for ex, tokens in cut] == [("long.png", 179)]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_become_the_background_never_black(tmp_path, mode):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    if mode == "LA":
        image = image.convert("LA")
    if mode == "P":
        image = Image.new("P", (8, 8), 0)
        image.info["transparency"] = 0
    image.save(tmp_path / "t.png")
    assert {tuple(p) for p in np.asarray(load_rgb(tmp_path / "t.png")).reshape(-1, 3).tolist()} == {(255, 255, 255)}
    assert {tuple(p) for p in np.asarray(load_rgb(tmp_path / "t.png", "black")).reshape(-1, 3).tolist()} == {(0, 0, 0)}
    assert {tuple(p) for p in np.asarray(load_rgb(tmp_path / "t.png", "#ff0000")).reshape(-1, 3).tolist()} == {(255, 0, 0)}


def test_hflip_off_never_flips_and_on_flips_about_half(tokenizer, tmp_path):
    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    for hflip, low, high in ((False, 0, 0), (True, 400, 600)):
        images = data.ImageSet([Example(tmp_path / "a.png", "x")], tokenizer, 8, False, "white", hflip)
        flips = images.flips(1000, torch.Generator().manual_seed(0))
        assert low <= int(flips.sum()) <= high


def test_flipped_batch_is_mirrored(tokenizer, tmp_path):
    image = Image.new("RGB", (8, 8), "white")
    image.paste((255, 0, 0), (0, 0, 4, 8))  # red left half
    image.save(tmp_path / "a.png")
    images = data.ImageSet([Example(tmp_path / "a.png", "x")], tokenizer, 8, False, "white", True)
    pixels, _ = images.batch([0, 0], torch.tensor([False, True]))
    assert torch.equal(pixels[1], pixels[0].flip(-1)) and not torch.equal(pixels[0], pixels[1])


def test_batches_shard_across_processes_and_cover_each_epoch():
    n, bs, world = 10, 1, 2
    seen = [p for step in range(5) for rank in range(world)
            for p in data.batch_positions(step, bs, rank, world, n, seed=3)]
    assert sorted(seen) == list(range(n))  # one epoch, every item once, no rank overlap
    rank0 = data.batch_positions(0, 2, 0, 2, n, 3)
    rank1 = data.batch_positions(0, 2, 1, 2, n, 3)
    assert not set(rank0) & set(rank1)


def test_class_image_count_check(tmp_path):
    examples = [Example(tmp_path / f"{i}.png", "girl") for i in range(5)]
    assert data.select_class_images(examples, 5) == examples
    assert data.select_class_images(examples, 3) == examples[:3]
    with pytest.raises(DatasetError, match="num_class_images is 8 but .* holds 5"):
        data.select_class_images(examples, 8)


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        data.list_images(tmp_path / "nope", "instance_data_dir")
    with pytest.raises(DatasetError, match="has no images"):
        data.list_images(tmp_path, "instance_data_dir")


def test_concepts_list(tmp_path):
    import json

    from dbnb.core.config import Config

    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{"instance_data_dir": "a", "instance_prompt": "x girl"},
                                {"instance_data_dir": "b", "instance_prompt": "y boy", "class_prompt": "boy"}]))
    concepts = data.concepts_from_config(Config(concepts_list=str(path)))
    assert [c.instance_prompt for c in concepts] == ["x girl", "y boy"]
    path.write_text(json.dumps([{"instance_dir": "a"}]))
    with pytest.raises(DatasetError, match="instance_dir"):
        data.concepts_from_config(Config(concepts_list=str(path)))


# --- captions in training (kohya's shuffle_caption / keep_tokens / dropouts) -----------------------

CAPTION = "nanU Unan, 1girl, pink hair, smile, school uniform, classroom"


def _variants(rules, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [data.vary_caption(CAPTION, rules, g) for _ in range(n)]


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    tags = CAPTION.split(", ")
    out = _variants(data.CaptionRules(shuffle=True, keep_tokens=1))
    assert all(v.split(", ")[0] == "nanU Unan" and sorted(v.split(", ")) == sorted(tags) for v in out)
    assert {v.split(", ")[1] for v in out} == set(tags[1:])  # every other tag reaches the second place
    assert len(set(out)) > 50
    two = _variants(data.CaptionRules(shuffle=True, keep_tokens=2))
    assert all(v.split(", ")[:2] == tags[:2] for v in two)
    assert _variants(data.CaptionRules(keep_tokens=3), n=5) == [CAPTION] * 5  # keep_tokens alone: as written


def test_caption_and_tag_dropout_rates_mean_what_kohya_says():
    assert set(_variants(data.CaptionRules(dropout_rate=1.0), n=20)) == {""}
    some = _variants(data.CaptionRules(dropout_rate=0.25))
    assert 60 <= some.count("") <= 140 and set(some) == {"", CAPTION}  # otherwise untouched
    assert set(_variants(data.CaptionRules(tag_dropout_rate=1.0, keep_tokens=2), n=20)) == {"nanU Unan, 1girl"}
    half = _variants(data.CaptionRules(tag_dropout_rate=0.5, keep_tokens=1))
    assert all(v.startswith("nanU Unan") for v in half)  # kept tags are never dropped
    kept = sum(len(v.split(", ")) - 1 for v in half) / (len(half) * 5)
    assert 0.4 < kept < 0.6
    # without shuffle the surviving tags keep their order
    assert all(v.split(", ") == [t for t in CAPTION.split(", ") if t in v.split(", ")] for v in half)


def test_caption_variants_depend_only_on_the_generator(tokenizer, tmp_path):
    rules = data.CaptionRules(shuffle=True, keep_tokens=1, tag_dropout_rate=0.2, dropout_rate=0.1)
    assert _variants(rules, seed=5) == _variants(rules, seed=5) != _variants(rules, seed=6)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "a.png")
    images = data.ImageSet([Example(tmp_path / "a.png", CAPTION)], tokenizer, 8, False, "white", False, rules)
    a = images.token_ids([0, 0, 0], torch.Generator().manual_seed(3))
    b = images.token_ids([0, 0, 0], torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (3, 77)
    g = torch.Generator().manual_seed(3)
    expected = [data.vary_caption(CAPTION, rules, g) for _ in range(3)]
    assert a.tolist() == [tokenizer(p, padding="max_length", max_length=77).input_ids for p in expected]
    plain = data.ImageSet([Example(tmp_path / "a.png", CAPTION)], tokenizer, 8, False, "white", False)
    assert torch.equal(plain.token_ids([0], torch.Generator()), plain.input_ids[[0]])


# --- alpha_mask_loss ---------------------------------------------------------------------------------

def test_alpha_mask_is_the_alpha_at_latent_size_and_flips_with_the_picture(tokenizer, tmp_path):
    cut = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    cut.paste((0, 0, 0, 0), (0, 0, 32, 64))  # left half transparent
    cut.save(tmp_path / "cut.png")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "opaque.png")
    images = data.ImageSet([Example(tmp_path / "cut.png", "x"), Example(tmp_path / "opaque.png", "x")], tokenizer,
                           64, False, "white", True, alpha_mask=True)
    assert images.masks.shape == (2, 1, 8, 8)
    cut_mask = images.masks[0, 0]
    assert torch.equal(cut_mask[:, :4], torch.zeros(8, 4)) and torch.equal(cut_mask[:, 4:], torch.ones(8, 4))
    assert torch.equal(images.masks[1], torch.ones(1, 8, 8))  # no alpha: counts everywhere
    masks = images.mask_batch([0, 0], torch.tensor([False, True]))
    assert torch.equal(masks[1], masks[0].flip(-1))
    pixels, _ = images.batch([0], torch.tensor([False]))
    assert pixels[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]  # the VAE still sees the picture on white
    assert images.without_loss() == []
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    clear = data.ImageSet([Example(tmp_path / "clear.png", "x")], tokenizer, 64, False, "white", False,
                          alpha_mask=True)
    assert clear.without_loss() == [tmp_path / "clear.png"]
    assert data.ImageSet([Example(tmp_path / "cut.png", "x")], tokenizer, 64, False, "white", False).masks is None


def test_every_picture_suffix_the_importer_takes_is_read_by_the_trainer(tmp_path):
    """One IMAGE_SUFFIXES: a GIF (first frame), a 16-bit TIFF and a .jfif train as they look."""
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.gif")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "b.tif")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.jfif", format="JPEG")
    (tmp_path / "notes.md").write_text("not a picture")
    found = data.list_images(tmp_path, "instance_data_dir")
    assert [p.name for p in found] == ["a.gif", "b.tif", "c.jfif"]
    gif, tif, jfif = (np.asarray(load_rgb(p)) for p in found)
    assert gif[0, 0].tolist() == pytest.approx([200, 10, 10], abs=2)
    assert tif[0, 0].tolist() == [round(40000 / 257)] * 3  # scaled to 8 bits, not clipped to white
    assert jfif[0, 0].tolist() == pytest.approx([10, 10, 200], abs=4)
