"""Test-prompt grids (`dbnb sample RUN_DIR`) on a real tiny run, on CPU: nothing mocked."""
import re
import shutil

import numpy as np
import pytest
from conftest import two_checkpoint_run
from PIL import Image

from dbnb.core.config import Config
from dbnb.evaluate.sample import SampleError, labelled_grid, prompt_set, sample_run
from dbnb.family.render import cpu_batch_size
from dbnb.run.checkpoints import CheckpointError
from dbnb.run.folder import RunFolder

# Few, small images: the whole module stays well under a minute on a CPU. The wide test image
# (test_wide) is rendered and scored in test_score.py; here the grids are all square.
FAST = ["test_seeds=2", "test_infer_steps=2", "test_flexibility_prompts=['{instance_prompt}, 1girl, swimsuit']",
        "test_wide=0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    """A two-checkpoint run that also trains the text encoder (so both parts are swapped)."""
    return two_checkpoint_run(tiny_dir, tmp_path_factory.mktemp("sample"), train_text_encoder=True)


@pytest.fixture(scope="module")
def first(run_dir, tmp_path_factory):
    """The first sampling of the run, plus a copy of its images (later calls write over them)."""
    result = sample_run(run_dir, FAST, progress=False)
    keep = tmp_path_factory.mktemp("first-images")
    shutil.copytree(result.folder, keep / "tests")
    return result, keep / "tests"


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_prompt_set_fills_the_seeds_templates():
    config = Config(instance_prompt="nanU Unan", class_prompt="Unan", test_class_prompt_in_negative=True,
                    test_negative_prompt="lowres",
                    test_flexibility_prompts=("{instance_prompt}, 1girl, solo, swimsuit, beach",))
    fidelity, flexibility, klass, wide = prompt_set(config)
    assert (fidelity.kind, fidelity.text) == ("fidelity", "nanU Unan, 1girl, solo")
    assert (flexibility.kind, flexibility.text) == ("flexibility", "nanU Unan, 1girl, solo, swimsuit, beach")
    # CLIP-T compares with the class word where the instance prompt was: CLIP never saw "nanU"
    assert flexibility.clip_text == "Unan, 1girl, solo, swimsuit, beach"
    # the seed's "Instance prompt + Class prompt ネガ" call, but never on the class-prompt row itself
    assert fidelity.negative == flexibility.negative == "lowres, Unan"
    assert (klass.kind, klass.text, klass.negative) == ("class", "Unan", "lowres")
    assert [p.index for p in (fidelity, flexibility, klass)] == [0, 1, 2]
    # test_wide: the first fidelity prompt once more, wide (the guide's 花月 test), last so the others keep their names
    assert (wide.index, wide.kind, wide.text, wide.negative) == (3, "fidelity", fidelity.text, fidelity.negative)
    assert wide.size == (768, 512) and fidelity.size is None and wide.shape == " (wide 768×512)"
    assert [p.size for p in prompt_set(config.replace(resolution=64))][-1] == (96, 64)  # a multiple of 8
    assert len(prompt_set(config.replace(test_wide=0))) == 3


def test_prompt_set_reads_filewords_prompts_and_no_class_prompt():
    config = Config(instance_prompt="[filewords]", instance_token="nanU", class_token="1girl", class_prompt="")
    prompts = prompt_set(config)
    assert prompts[0].text == "nanU 1girl, 1girl, solo"
    assert prompts[0].clip_text == "1girl, solo"
    assert "class" not in [p.kind for p in prompts]  # no class prompt: no drift row
    with pytest.raises(SampleError, match="instance_prompt"):
        prompt_set(Config())


def test_prompt_set_reads_filewords_from_the_captions_when_no_token_is_set(tmp_path):
    for name, caption in (("a", "hnzk girl, smile"), ("b", "hnzk girl, from side"), ("c", "smile, hnzk girl")):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    config = Config(instance_prompt="masterpiece, [filewords]", instance_data_dir=str(tmp_path))
    assert prompt_set(config)[0].text == "masterpiece, hnzk girl, 1girl, solo"
    with pytest.raises(SampleError, match=r"takes its words from the captions.*does not exist.*instance_prompt="):
        prompt_set(config.replace(instance_data_dir=str(tmp_path / "moved")))


def test_choose_checkpoints_by_test_steps(run_dir):
    run = RunFolder(run_dir)
    assert [c.step for c in run.choose("all")] == [1, 2]
    assert [c.step for c in run.choose("latest")] == [2]
    assert [c.step for c in run.choose("2, 1")] == [1, 2]
    with pytest.raises(CheckpointError, match=r"test_steps: no checkpoint at step 500; saved steps: 1, 2"):
        run.choose("500")
    with pytest.raises(CheckpointError, match="test_steps"):
        run.choose("last")
    with pytest.raises(CheckpointError, match="without use_ema"):
        sample_run(run_dir, ema=True, progress=False)
    assert [c.kind for c in run.checkpoints()] == ["full", "full"]
    assert run.pick(2).parts >= {"unet", "text_encoder"} and "ema" not in run.pick(2).parts
    assert run.pick(None).step == 2


def test_grid_has_rows_of_steps_and_columns_of_seeds_with_labels(first):
    result, _ = first
    assert [r.label for r in result.rows] == ["base model", "step 1", "step 2"]
    assert [p.kind for p in result.prompts] == ["fidelity", "flexibility", "class"]
    assert [g.name for g in result.grids] == ["grid-0.png", "grid-1.png", "grid-2.png"]
    for prompt, grid_path in zip(result.prompts, result.grids):
        grid = pixels(grid_path)
        size, rows, cols = 64, len(result.rows), len(result.seeds)
        label_w, top = grid.shape[1] - cols * size, grid.shape[0] - rows * size
        assert label_w > 20 and top > 20  # room for the row labels and the title / seed labels
        for r, row in enumerate(result.rows):
            for c, seed in enumerate(result.seeds):
                tile = grid[top + r * size: top + (r + 1) * size, label_w + c * size: label_w + (c + 1) * size]
                assert np.array_equal(tile, pixels(result.image_path(row, prompt, seed))), (prompt.index, r, c)
            assert grid[top + r * size: top + (r + 1) * size, :label_w].min() < 128, f"row {r} has no label"
        for c in range(cols):
            assert grid[top - 16: top, label_w + c * size: label_w + (c + 1) * size].min() < 128, f"col {c} label"


def test_same_seed_and_checkpoint_give_identical_images_across_calls(run_dir, first):
    result, kept = first
    # Only step 2 this time, so step 1 is never swapped in first: no weights may leak between rows.
    again = sample_run(run_dir, [*FAST, "test_steps=2"], force=True, progress=False)
    assert again.rendered == 2 * len(again.prompts) * len(again.seeds)
    for row in again.rows:
        for prompt in again.prompts:
            for seed in again.seeds:
                name = f"{row.name}/p{prompt.index}-s{seed}.png"
                assert np.array_equal(pixels(again.folder / name), pixels(kept / name)), name
    base, step2 = again.rows
    p0 = again.prompts[0]
    assert not np.array_equal(pixels(again.image_path(base, p0, 0)), pixels(again.image_path(step2, p0, 0)))
    assert not np.array_equal(pixels(again.image_path(base, p0, 0)), pixels(again.image_path(base, p0, 1)))


def test_images_made_with_the_same_settings_are_reused(run_dir, first):
    again = sample_run(run_dir, FAST, progress=False)
    assert (again.rendered, again.reused) == (0, 3 * 3 * 2)
    changed = sample_run(run_dir, [*FAST, "test_seeds=3"], progress=False)
    assert (changed.rendered, changed.reused) == (3 * 3, 3 * 3 * 2)  # only the new seed is made
    # the layer SD 1.x renders at anyway (clip_skip 0 is 1) keeps them; another clip skip draws others
    same = sample_run(run_dir, [*FAST, "test_seeds=3", "clip_skip=1"], progress=False)
    assert (same.rendered, same.reused) == (0, 3 * 3 * 3)
    other = sample_run(run_dir, [*FAST, "test_seeds=3", "clip_skip=2"], progress=False)
    assert (other.rendered, other.reused) == (3 * 3 * 3, 0)


def test_html_page_references_every_image(run_dir, first):
    result = sample_run(run_dir, FAST, progress=False)
    page = result.html.read_text(encoding="utf-8")
    linked = set(re.findall(r"(?:src|href)='([^']+)'", page))
    images = {f"{r.name}/p{p.index}-s{s}.png" for r in result.rows for p in result.prompts for s in result.seeds}
    assert len(images) == 3 * 3 * 2 and images <= linked
    assert {g.name for g in result.grids} <= linked
    assert all((result.folder / name).is_file() for name in linked)  # relative, and nothing dangling
    for prompt in result.prompts:
        assert prompt.text in page


def test_labelled_grid_wraps_a_long_title():
    tile = Image.new("RGB", (64, 64), "red")
    short = labelled_grid([[tile]], ["base model"], ["seed 0"], "p0")
    long = labelled_grid([[tile]], ["base model"], ["seed 0"], "p0 " + "very long prompt words " * 6)
    assert long.width == short.width and long.height > short.height


def test_sample_run_needs_a_run_folder(tmp_path):
    with pytest.raises(SampleError, match="config.json"):
        sample_run(tmp_path)


def test_the_cpu_batch_holds_as_many_pixels_as_four_512px_images_up_to_sixteen():
    assert cpu_batch_size(512) == 4
    assert cpu_batch_size(256) == 16 and cpu_batch_size(64) == 16  # the tiny models
    assert cpu_batch_size(768) == 1


def test_the_preview_grid_says_what_its_labels_stand_for(tmp_path):
    """p0 / s7 under each preview are explained on the grid itself (users open grid.png alone)."""
    from dbnb.family.render import make_grid
    from dbnb.train.previews import save_previews

    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    results = [("hnzk girl", 7, red), ("hnzk girl, upper body", 7, blue)]
    grid = Image.open(save_previews(results, tmp_path, cols=1))
    plain = make_grid([red, blue], 1, ["p0 s7", "p1 s7"])
    assert grid.height > plain.height + 2 * 14  # two prompt lines and the seed's line at least
    legend = np.asarray(grid.convert("L"))[plain.height:]
    assert (legend < 100).sum() > 50  # text was drawn there
    assert (tmp_path / "prompts.txt").read_text() == "p0: hnzk girl\np1: hnzk girl, upper body\n"
