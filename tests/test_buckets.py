"""Aspect-ratio bucketing (issue 34) on the tiny models: which bucket a picture trains at, batches
cut from one bucket, masks that follow the picture's crop, and a resume that continues exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_9_at_step
from PIL import Image
from test_family import DualEncoderFamily

from dbnb.core.config import ConfigError
from dbnb.data import buckets
from dbnb.data.batches import cache_latents, epoch_length, gather_examples, next_batch, read_images
from dbnb.family import base
from dbnb.run.checkpoints import RunFolder
from dbnb.train.loop import train

TALL, WIDE = (48, 96), (96, 48)  # at the tiny 64 px: buckets 40x88 and 88x40


def add_shapes(config, shapes=(TALL, WIDE)):
    """Tall and wide copies of the first demo picture beside the square ones."""
    folder = Path(config.instance_data_dir)
    first = Image.open(sorted(folder.glob("*.png"))[0]).convert("RGB")
    for k, size in enumerate(shapes):
        first.resize(size).save(folder / f"shape{k}.png")
    return config


def sd_buckets():
    return buckets.bucket_sizes(512, 256, 1024)


def test_tall_wide_and_square_pictures_go_to_the_bucket_of_their_shape():
    sizes = sd_buckets()
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in sizes)
    assert (512, 512) in sizes and min(map(min, sizes)) == 256 and max(map(max, sizes)) == 1024
    assign = lambda size, limit=2.0: buckets.assign(size, sizes, limit, 64)  # noqa: E731
    assert assign((1000, 1000)) == (512, 512)
    tall = assign((832, 1216))  # a full-body picture, about 2:3
    assert tall == (448, 576) and assign((1216, 832)) == (576, 448) and assign((768, 1152)) == (384, 640)
    # cropped by as little as the shapes allow: 832x1216 -> 448x655, 79 rows cut, 39 at the top
    assert buckets.cover((832, 1216), tall) == ((448, 655), (39, 0))
    # a small picture is not blown up past the limit: a bucket of its own shape instead
    assert assign((160, 240)) == (320, 448) and assign((160, 240), limit=1.0) == (128, 192)
    # nor past the buckets' largest area and side, however far its shape is from theirs
    strip = assign((100, 1000))
    assert strip[0] * strip[1] <= 512 * 512 and max(strip) <= 1024 and strip == (64, 1024)
    # SD resolutions step by 64 px, the tiny test models by one latent
    assert buckets.bucket_step(512) == buckets.bucket_step(1024) == 64 and buckets.bucket_step(64) == 8
    tiny = buckets.bucket_sizes(64, 32, 128)
    assert buckets.assign(TALL, tiny, 2.0, 8) == (40, 88) and buckets.assign(WIDE, tiny, 2.0, 8) == (88, 40)


def test_bucket_settings_are_checked_with_what_to_do():
    with pytest.raises(ConfigError, match="bucket_min_side: 100 must be a multiple of 8"):
        from dbnb.core.config import Config
        Config(bucket_min_side=100)
    with pytest.raises(ConfigError, match="bucket_max_side: 256 is below resolution 512"):
        Config(bucket_max_side=256)


def test_each_batch_is_one_bucket_every_picture_once_an_epoch(make_config, tiny_dir):
    from dbnb.family.sd1.load import load_pipeline

    config = add_shapes(make_config(bucketing=True, train_batch_size=2, with_prior_preservation=True,
                                    num_class_images=6, hflip=True))
    examples = gather_examples(config)
    pipe = load_pipeline(str(tiny_dir))
    batches = read_images(config, pipe.tokenizer, examples)
    plan = batches.plan
    assert plan.histogram() == {(64, 64): 3, (40, 88): 1, (88, 40): 1}
    # square class images: the square bucket's own (6 of them: 6 positions); the others borrow all six
    assert plan.lengths == {(40, 88): 2, (64, 64): 6, (88, 40): 2} and plan.borrowing == {(40, 88), (88, 40)}
    assert epoch_length(config, examples) == batches.epoch_len == 10
    batches.latents = cache_latents(batches, pipe.vae, config.hflip)
    seen = []
    for micro_step in range(batches.epoch_len // 2):
        batch = next_batch(batches, micro_step, config, 0, 1, pipe.vae)
        bucket, instance, _ = plan.picks(micro_step, 0, 1)
        assert batch.latents.shape == (4, 4, bucket[1] // 8, bucket[0] // 8)
        assert batch.inputs["input_ids"].shape == (4, 77)
        assert batch.inputs["target_size"].tolist() == [[bucket[1], bucket[0]]] * 4
        seen += [plan.instance[bucket][i] for i in instance]
    # each instance picture at least once in the epoch; only the short buckets repeat theirs
    assert sorted(set(seen)) == list(range(5)) and len(seen) == 10
    # the original size and crop a family conditioned on them reads (SD 1.x reads input_ids alone)
    tall = batches.instance.sets[(40, 88)]
    rows = batches.instance.size_inputs((40, 88), [0, 0], torch.tensor([False, True]))
    assert rows["original_size"].tolist() == [[96, 48], [96, 48]] and tall.images.shape[-2:] == (88, 40)
    assert rows["crops_coords_top_left"].tolist() == [[0, 2], [0, 2]]  # 44 px wide, 2 cut each side


def test_each_picture_file_is_decoded_once_at_its_bucket(make_config, monkeypatch):
    from collections import Counter

    config = add_shapes(make_config(bucketing=True))
    real, opened = Image.open, Counter()
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.update([Path(fp).name]) or real(fp, *a, **k))
    examples = gather_examples(config)
    assert epoch_length(config, examples) == 5  # the plan reads the sizes the check noted
    batches = read_images(config, _tokenizer(config), examples)
    assert opened == {e.path.name: 1 for e in examples[0]} and len(opened) == 5
    tall = Path(config.instance_data_dir) / "shape0.png"
    assert torch.equal(batches.instance.sets[(40, 88)].images[0],
                       torch.from_numpy(np.asarray(buckets.fit(real(tall).convert("RGB"), (40, 88)))).permute(2, 0, 1))


def test_the_alpha_mask_follows_the_pictures_resize_and_crop(make_config, tiny_dir):
    from transformers import CLIPTokenizer

    config = make_config(bucketing=True, alpha_mask_loss=True)
    cut = Image.new("RGBA", (60, 120), (200, 30, 30, 255))  # tall: bucket 40x88, cropped at the sides
    cut.paste((0, 0, 0, 0), (0, 0, 60, 50))  # the top 50 rows transparent
    cut.paste((0, 0, 0, 0), (0, 0, 9, 120))  # and a strip at the left, partly cropped away
    cut.save(Path(config.instance_data_dir) / "cut.png")
    batches = read_images(config, CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer"))
    images = batches.instance.sets[(40, 88)]
    picture, mask = images.images[0], images.masks[0, 0]
    assert mask.shape == (11, 5)
    # red (G 30) put on white (G 255): the picture's own G channel says how opaque each pixel was
    opacity = (255.0 - torch.from_numpy(np.asarray(picture[1], dtype=np.float32))) / (255 - 30)
    expected = torch.nn.functional.avg_pool2d(opacity[None, None], 8)[0, 0]
    torch.testing.assert_close(mask, expected, atol=0.03, rtol=0)
    assert mask[0].max() == 0 and mask[-1, 1:].min() == 1 and 0 < mask[-1, 0] < 1
    flipped = images.mask_batch([0], torch.tensor([True]))[0, 0]
    assert torch.equal(flipped, mask.flip(-1))


def test_the_prep_report_shows_the_bucket_histogram(tmp_path):
    from dbnb.core.config import Config
    from dbnb.prep.pipeline import prepare_dataset
    from dbnb.prep.report import bucket_line

    src = tmp_path / "src"
    src.mkdir()
    for name, size in (("tall", TALL), ("wide", WIDE), ("square", (64, 64)), ("square2", (80, 80))):
        Image.new("RGB", size, (200, 30, 30)).save(src / f"{name}.png")
    config = Config(resolution=64, bucketing=True)
    assert bucket_line(sorted(src.glob("*.png")), config) == \
        "buckets (bucketing=true, width x height): 64x64: 2, 40x88: 1, 88x40: 1"
    assert bucket_line(sorted(src.glob("*.png")), config.replace(bucketing=False)) == ""
    # prep squares what it writes: the report says so, and how to train at the pictures' own shapes
    report = prepare_dataset(config, src=src, out=tmp_path / "out", progress=False, remove_background=False,
                             face_detector=None)
    assert report.buckets.startswith("buckets (bucketing=true, width x height): 64x64: 4 — every picture is square")
    assert report.buckets in report.summary() and report.buckets in (tmp_path / "out" / "report.md").read_text()


def test_prep_keeps_a_tall_picture_tall_and_training_draws_it_at_a_tall_bucket(make_config, tiny_dir, tmp_path):
    """The notebook flow (02 prep, then 04 train) with square_mode=keep: a full-body picture is
    prepared at its bucket, not squared, and trains there whole."""
    from dbnb.family.sd1.load import load_pipeline
    from dbnb.prep.pipeline import prepare_dataset

    config = make_config(bucketing=True, square_mode="keep", train_batch_size=1)
    src = Path(config.instance_data_dir)
    first = Image.open(sorted(src.glob("*.png"))[0]).convert("RGB")
    first.resize((96, 192)).save(src / "tall.png")  # 1:2, larger than its 40x88 bucket
    first.resize((24, 48)).save(src / "small.png")  # too small for any bucket: never enlarged by prep
    out = tmp_path / "prepared"
    report = prepare_dataset(config, src=src, out=out, progress=False, remove_background=False, face_detector=None)
    sizes = {p.name.split("-")[0]: Image.open(p).size for p in report.images}
    assert sizes["tall"] == (40, 88) and sizes["small"] == (24, 48)
    assert {sizes[n] for n in sizes if n not in ("tall", "small")} == {(64, 64)}
    small = next(r for r in report.files if r.source == "small.png")
    assert any(w.startswith("low resolution: 24x48px, kept at 24x48") for w in small.warnings)
    # the small one trains enlarged by at most bucket_upscale_limit (2): to 40x88, 1.83 times
    assert report.buckets == "buckets (bucketing=true, width x height): 64x64: 3, 40x88: 2"
    # training reads the prepared folder: the tall picture is drawn whole, at its own bucket
    config = config.replace(instance_data_dir=str(out))
    examples = gather_examples(config)
    pipe = load_pipeline(str(tiny_dir))
    batches = read_images(config, pipe.tokenizer, examples)
    names = [examples[0][i].path.name.split("-")[0] for i in batches.plan.instance[(40, 88)]]
    assert sorted(names) == ["small", "tall"]
    tall = examples[0][batches.plan.instance[(40, 88)][names.index("tall")]]
    prepared = torch.from_numpy(np.array(Image.open(tall.path).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(batches.instance.sets[(40, 88)].images[names.index("tall")], prepared)  # as prepared, whole
    batches.latents = cache_latents(batches, pipe.vae, config.hflip)
    step = next(m for m in range(batches.epoch_len) if batches.plan.picks(m, 0, 1)[0] == (40, 88))
    assert next_batch(batches, step, config, 0, 1, pipe.vae).latents.shape == (1, 4, 11, 5)


def test_the_trainer_says_when_bucketing_finds_only_square_pictures(make_config, capsys):
    config = make_config(bucketing=True)  # the three square demo pictures, as square_mode=pad writes them
    read_images(config, _tokenizer(config))
    said = capsys.readouterr().out
    assert "per bucket (width x height): 64x64: 3 — every picture is square" in said
    assert "prepare them with square_mode=keep (now pad;" in said


def test_keep_sizes_by_the_buckets_rule_and_needs_bucketing():
    from dbnb.core.config import Config

    config = Config(bucketing=True, square_mode="keep")
    assert buckets.kept_size((832, 1216), config) == ((448, 576), False)   # its bucket, as training gives it
    assert buckets.kept_size((2000, 2000), config) == ((512, 512), False)
    assert buckets.kept_size((160, 240), config) == ((128, 192), True)     # never enlarged: its own size
    assert buckets.assign_all([(448, 576)], config) == [(448, 576)]        # the written size is its bucket
    with pytest.raises(ConfigError, match="square_mode=keep with bucketing=false: .* squeeze every one to a "
                                          r"512x512 square\. Set bucketing=true .* or square_mode=pad"):
        Config(square_mode="keep")
    with pytest.raises(ConfigError, match="would crop every one"):
        Config(square_mode="keep", center_crop=True)


def test_class_images_are_made_at_the_buckets_sizes_in_proportion(make_config, tmp_path):
    from collections import Counter

    from dbnb.prep import classimages as ci

    assert Counter(buckets.allot({"a": 3, "b": 1, "c": 1}, 10)) == {"a": 6, "b": 2, "c": 2}
    assert Counter(buckets.allot({"a": 3, "b": 1, "c": 1}, 5)) == {"a": 3, "b": 1, "c": 1}  # any first N too
    config = add_shapes(make_config(bucketing=True, with_prior_preservation=True, num_class_images=10,
                                    class_images_mode="transparent", class_data_dir=str(tmp_path / "blank")))
    ci.make_class_images(config, progress=False)
    blank = Counter(Image.open(p).size for p in ci.existing_images(Path(config.class_data_dir)))
    assert blank == {(64, 64): 6, (40, 88): 2, (88, 40): 2}  # 3 : 1 : 1, as the instance pictures
    plan = buckets.plan_buckets(config, *gather_examples(config))
    assert not plan.borrowing and plan.lengths == {(40, 88): 2, (64, 64): 6, (88, 40): 2}
    # generated from the base model: batches of one shape each, the size in the PNG's parameters
    generated = make_config(bucketing=True, num_class_images=5, class_batch_size=2, class_infer_steps=1,
                            class_data_dir=str(tmp_path / "generated"))
    written = ci.generate_class_images(add_shapes(generated), progress=False)
    sizes = {p.name: Image.open(p).size for p in written}
    assert Counter(sizes.values()) == {(64, 64): 3, (40, 88): 1, (88, 40): 1}
    assert all(f"Size: {w}x{h}" in Image.open(p).text["parameters"] for p in written for w, h in [sizes[p.name]])


def test_previews_render_at_the_bucket_most_pictures_train_at(make_config):
    config = add_shapes(make_config(bucketing=True, max_train_steps=1, sample_every_steps=1, num_samples=1,
                                    sample_steps=1, sample_prompts=("hnzk girl",)), shapes=(TALL,) * 4)
    plan = buckets.plan_buckets(config, *gather_examples(config))
    assert buckets.main_bucket(plan) == (40, 88)  # 4 tall pictures beside the 3 square ones
    run = RunFolder(train(config, progress=False).run_dir)
    previews = sorted(run.samples_dir(1).glob("p*-s*.png"))
    assert previews and all(Image.open(p).size == (40, 88) for p in previews)
    # without bucketing, the square resolution as before
    square = make_config(run_name="square", max_train_steps=1, sample_every_steps=1, num_samples=1,
                         sample_steps=1, sample_prompts=("hnzk girl",))
    run = RunFolder(train(square, progress=False).run_dir)
    previews = sorted(run.samples_dir(1).glob("p*-s*.png"))
    assert previews and all(Image.open(p).size == (64, 64) for p in previews)


def _resumed_equals_straight(config, steps: int, half: int):
    straight = train(config.replace(run_name="straight", max_train_steps=steps), progress=False)
    train(config.replace(run_name="resumed", max_train_steps=half, save_every_steps=half), progress=False)
    resumed = train(config.replace(run_name="resumed", max_train_steps=steps), resume="latest", progress=False)
    a, b = (RunFolder(r.run_dir).pick(steps).denoiser_state() for r in (straight, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_a_resume_across_buckets_continues_exactly(make_config):
    config = add_shapes(make_config(bucketing=True, train_batch_size=1, hflip=True, with_prior_preservation=True,
                                    num_class_images=6, shuffle_caption=True, seed=5))
    plan = read_images(config, _tokenizer(config)).plan
    # an epoch is 8 micro-batches; stopped at 10, in the second epoch, the run goes on across buckets
    drawn = [plan.picks(m, 0, 1)[0] for m in range(14)]
    assert plan.epoch_len == 8 and len(set(drawn[:10])) == 3 and len(set(drawn[10:])) == 2
    _resumed_equals_straight(config, 14, 10)


def _tokenizer(config):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(Path(config.pretrained_model_name_or_path) / "tokenizer")


@pytest.mark.own_logic
def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(make_config, tmp_path):
    """As a user runs it: `dbnb train`, killed between two saves mid-epoch, then `--resume latest`."""
    config = add_shapes(make_config(bucketing=True, max_train_steps=8, save_every_steps=3, seed=7,
                                    run_name="killed"))
    cli = [sys.executable, "-m", "dbnb", "train", str(config.save(tmp_path / "killed.json")), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    log = tmp_path / "runs" / "killed" / "logs" / "train.jsonl"
    kill_9_at_step(cli, env, log, 5)  # past the save at 3, before 6
    resumed = subprocess.run(cli + ["--resume", "latest"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[dbnb] bucketing: instance pictures per bucket (width x height): 64x64: 3, 40x88: 1, 88x40: 1" \
        in resumed.stdout
    straight = train(config.replace(run_name="straight"), progress=False)
    a, b = (RunFolder(tmp_path / "runs" / name).pick(8).denoiser_state() for name in ("killed", "straight"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == list(range(1, 9))
    assert straight.step == 8


class SizedFamily(DualEncoderFamily):
    """The two-encoder stand-in, conditioned on size as SDXL is: it reads the batch's original
    size, crop and target size, and checks the target is the size of the latents it denoises."""
    seen = []

    def encode_prompts(self, encoder, inputs, clip_skip=0):
        conditioning = super().encode_prompts(encoder, inputs, clip_skip)
        sizes = torch.cat([inputs[k] for k in ("original_size", "crops_coords_top_left", "target_size")], dim=1)
        return {**conditioning, "sizes": sizes}

    def predict(self, denoiser, noisy, timesteps, conditioning):
        target = conditioning["sizes"][:, 4:6]
        assert (target == torch.tensor(noisy.shape[-2:]) * 8).all(), (target, noisy.shape)
        self.seen.append(tuple(noisy.shape[-2:]))
        return super().predict(denoiser, noisy, timesteps, conditioning)


def test_a_family_conditioned_on_size_trains_and_resumes_on_buckets(make_config, tmp_path, monkeypatch):
    family = SizedFamily()
    monkeypatch.setattr(base, "FAMILIES", list(base.FAMILIES))
    base.register(family)
    model = SizedFamily.make_model(tmp_path / "sized-model")
    config = add_shapes(make_config(pretrained_model_name_or_path=str(model), bucketing=True, learning_rate=1e-3))
    _resumed_equals_straight(config, 6, 3)
    assert {(11, 5), (8, 8), (5, 11)} <= set(family.seen)


def test_the_report_gives_the_pictures_buckets_not_one_square(make_config):
    from dbnb.ship.report import section_images

    config = add_shapes(make_config(bucketing=True))
    _, _, processed, count = section_images(config, None)
    assert count == 5
    assert processed == ["5 images, buckets (bucketing=true, width x height): 64x64: 3, 40x88: 1, 88x40: 1 at training"]
    _, _, processed, _ = section_images(config.replace(bucketing=False), None)
    assert processed == ["5 images, 64×64 at training"]
