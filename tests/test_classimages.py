"""Class (regularization) images on the tiny model, on CPU: real generation, real files."""
import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dbnb.core.config import Config
from dbnb.data.batches import read_images
from dbnb.data.dataset import DatasetError
from dbnb.family.render import cpu_batch_size
from dbnb.family.sd1 import load as models
from dbnb.family.sd1.skeleton import SKELETON
from dbnb.prep import classimages as ci
from dbnb.world.demo import draw_character


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(SKELETON / "tokenizer", model_max_length=77)


@pytest.fixture
def make_config(tiny_dir, tmp_path):
    def make(**overrides):
        base = dict(pretrained_model_name_or_path=str(tiny_dir), class_data_dir=str(tmp_path / "class"),
                    class_prompt="girl", num_class_images=5, resolution=64, class_infer_steps=1,
                    mixed_precision="no")
        return Config(**{**base, **overrides})
    return make


@pytest.fixture
def loads(monkeypatch):
    """Counts base-model loads (the real loader still runs)."""
    calls = []
    real = models.load_pipeline

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(models, "load_pipeline", counting)
    return calls


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def pixels_of(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def instance_folder(tmp_path, n):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(n):
        draw_character(i).save(folder / f"{i}.png")
    return folder


# --- generate ------------------------------------------------------------------------------------

def test_generate_writes_numbered_pngs_with_captions_of_the_right_size(make_config, loads):
    config = make_config(class_batch_size=2)  # 5 images: batches of 2, 2, 1
    written = ci.generate_class_images(config, progress=False)
    folder = ci.class_folder(config)
    assert [p.name for p in written] == [f"class-{k:05d}.png" for k in range(5)]
    assert names(folder) == sorted([f"class-{k:05d}.{s}" for k in range(5) for s in ("png", "txt")])  # no .part
    for k in range(5):
        image = Image.open(folder / f"class-{k:05d}.png")
        assert image.size == (64, 64) and image.mode == "RGB"
        assert (folder / f"class-{k:05d}.txt").read_text() == "girl"
        assert f"Seed: {k}," in image.text["parameters"] and "CFG scale: 12" in image.text["parameters"]
    assert len(loads) == 1  # loaded once for the whole call
    assert ci.check_class_images(config).ok


def test_an_unwritable_class_folder_is_named_before_the_model_loads(make_config, loads, tmp_path):
    from dbnb.core.disk import NotWritableError

    (tmp_path / "a-file").write_text("x")
    config = make_config(class_data_dir=str(tmp_path / "a-file" / "class"))
    with pytest.raises(NotWritableError, match=r"Cannot write class images to .*a-file/class"):
        ci.generate_class_images(config, progress=False)
    with pytest.raises(NotWritableError, match="Cannot write class images"):
        ci.make_class_images(config.replace(class_images_mode="transparent"))
    assert loads == []


def test_rerun_after_deleting_two_regenerates_only_those_two(make_config, loads):
    # Ancestral sampling draws fresh noise at every step but the last: the hard case.
    config = make_config(class_sampler="euler_a", class_infer_steps=3)
    ci.generate_class_images(config, progress=False)  # auto batch on CPU: 4 + 1
    folder = ci.class_folder(config)
    before = {p.name: (p.stat().st_mtime_ns, pixels_of(p)) for p in folder.glob("*.png")}
    for k in (1, 3):
        (folder / f"class-{k:05d}.png").unlink()
    written = ci.generate_class_images(config.replace(class_batch_size=1), progress=False)
    assert [p.name for p in written] == ["class-00001.png", "class-00003.png"]
    for name, (mtime, old) in before.items():
        p = folder / name
        if name in ("class-00001.png", "class-00003.png"):
            # Same seed, other batch size: the same picture (up to float rounding).
            assert np.abs(pixels_of(p) - old).max() <= 2
        else:
            assert p.stat().st_mtime_ns == mtime
    assert ci.generate_class_images(config, progress=False) == []  # complete: nothing to do...
    assert len(loads) == 2  # ...and the base model is not even loaded


@pytest.mark.parametrize("sampler, cls, shown", [("ddim", "DDIMScheduler", "DDIM"),
                                                 ("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
                                                 ("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M")])
def test_samplers(make_config, sampler, cls, shown):
    config = make_config(class_sampler=sampler, num_class_images=1)
    models = ci.open_base(config)
    pipe = ci.load_generation_pipeline(config, models)
    assert type(pipe.scheduler).__name__ == cls
    if sampler == "dpmpp_2m":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and pipe.scheduler.config.solver_order == 2
    (path,) = ci.generate_class_images(config, progress=False, models=models)
    assert f"Sampler: {shown}," in Image.open(path).text["parameters"]


def test_filewords_class_prompt_samples_with_the_class_token(make_config):
    assert ci.generation_prompt(make_config(class_prompt="[filewords]", class_token="1girl")) == "1girl"
    assert ci.generation_prompt(make_config(class_prompt="masterpiece, [filewords]", class_token="1girl")) \
        == "masterpiece, 1girl"


def test_errors_name_the_setting(make_config):
    with pytest.raises(ci.ClassImagesError, match="class_prompt is empty"):
        ci.generate_class_images(make_config(class_prompt=""))
    with pytest.raises(ci.ClassImagesError, match="class_prompt is empty once"):
        ci.generate_class_images(make_config(class_prompt="[filewords]"))
    with pytest.raises(ci.ClassImagesError, match="num_class_images is 0"):
        ci.generate_class_images(make_config(num_class_images=0))
    with pytest.raises(ci.ClassImagesError, match="class_data_dir is empty"):
        ci.make_class_images(make_config(class_data_dir=""))
    with pytest.raises(ci.ClassImagesError, match="class_images_import is empty"):
        ci.make_class_images(make_config(class_images_mode="import"))
    assert issubclass(ci.ClassImagesError, DatasetError)  # the CLI prints these without a traceback


def test_auto_batch_size_from_free_vram(make_config, monkeypatch):
    import dbnb.core.hardware

    free = {}
    monkeypatch.setattr(dbnb.core.hardware, "cuda_summary", lambda: {"free_vram_gib": free["gib"]})
    config, cuda = make_config(resolution=512), torch.device("cuda")
    for gib, expected in ((40.0, ci.GPU_MAX_BATCH), (6.0, 4), (3.5, 1), (1.0, 1)):
        free["gib"] = gib
        assert ci.pick_batch_size(config, cuda) == expected
    free["gib"] = 6.0
    assert ci.pick_batch_size(config, cuda, torch.float32) == 2  # fp32: twice the memory per image
    assert ci.pick_batch_size(config.replace(class_batch_size=3), cuda) == 3  # explicit wins
    assert ci.pick_batch_size(config, torch.device("cpu")) == cpu_batch_size(512) == 4
    assert ci.pick_batch_size(config.replace(resolution=64), torch.device("cpu")) == 16  # the tiny models


# --- transparent ---------------------------------------------------------------------------------

def test_out_of_memory_halves_the_batch_on_a_torch_before_2_5(make_config, monkeypatch):
    # torch < 2.5 has no torch.OutOfMemoryError: naming it in the `except` would raise there
    monkeypatch.delattr(torch, "OutOfMemoryError")
    real, sizes = ci.render_batch, []

    def render(pipe, decode, config, prompt, indices, size):
        sizes.append(len(indices))
        if len(indices) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(pipe, decode, config, prompt, indices, size)

    monkeypatch.setattr(ci, "render_batch", render)
    written = ci.generate_class_images(make_config(class_batch_size=4, num_class_images=2), progress=False)
    assert len(written) == 2 and sizes == [2, 2, 1, 1]


def test_transparent_images_are_rgba_alpha0_and_train_as_white_or_black(make_config, tmp_path, tokenizer):
    instance = instance_folder(tmp_path, 2)
    config = make_config(class_images_mode="transparent", num_class_images=0, instance_data_dir=str(instance))
    status = ci.make_class_images(config, progress=False)
    assert (status.have, status.wanted, status.ok) == (20, 20, True)  # 10x the 2 instance images
    assert "num_class_images=20" in status.message  # the trainer's config must say it
    pngs = sorted(ci.class_folder(config).glob("*.png"))
    assert len(pngs) == 20 and (ci.class_folder(config) / "class-00019.txt").read_text() == "girl"
    for p in pngs:
        image = Image.open(p)
        assert image.mode == "RGBA" and image.size == (64, 64)
        assert not np.asarray(image)[..., 3].any()
    train = config.replace(with_prior_preservation=True, num_class_images=20, instance_prompt="hnzk girl")
    assert torch.all(read_images(train, tokenizer).klass.images == 255)  # white: the default background
    black = read_images(train.replace(background_color="black"), tokenizer).klass.images
    assert black.shape == (20, 3, 64, 64) and torch.all(black == 0)  # the old extension's black


def test_black_mode_stays_black_on_a_white_background(make_config, tmp_path, tokenizer):
    config = make_config(with_prior_preservation=True, instance_prompt="hnzk girl", class_images_mode="black",
                         instance_data_dir=str(instance_folder(tmp_path, 1)))
    assert ci.make_class_images(config, progress=False).ok
    pngs = sorted(ci.class_folder(config).glob("*.png"))
    assert len(pngs) == 5 and all(Image.open(p).mode == "RGB" for p in pngs)
    assert torch.all(read_images(config, tokenizer).klass.images == 0)  # background_color is white


def test_cli_classimages_tops_up_and_prints_errors_without_traceback(make_config, tmp_path, capsys):
    from dbnb.faces.cli import main

    config = make_config(class_images_mode="transparent", num_class_images=3)
    path = config.save(tmp_path / "my.yaml")
    assert main(["classimages", str(path)]) == 0
    assert len(list(ci.class_folder(config).glob("*.png"))) == 3
    assert main(["classimages", str(path), "class_images_mode=import",
                 f"class_images_import={tmp_path / 'empty'}", "num_class_images=7"]) != 0
    assert "class_images_import" in capsys.readouterr().err


def test_cli_classimages_imports_from_a_google_drive_folder(make_config, tmp_path, drive, capsys):
    from dbnb.faces.cli import main

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(png, "PNG")
    link = drive.folder("girls", {f"g{i}.png": png.getvalue() for i in range(3)} | {"more/g.png": png.getvalue()})
    path = make_config(num_class_images=4).save(tmp_path / "my.yaml")
    assert main(["classimages", str(path), "class_images_mode=import", f"class_images_import={link}"]) == 0
    assert names(tmp_path / "class") == ["g0.png", "g1.png", "g2.png", "more_g.png"]
    assert main(["classimages", str(path), "class_images_mode=import",
                 "class_images_import=https://drive.google.com/file/d/1NotSharedWithAnyoneAtAll000000/view"]) == 2
    assert "class_images_import" in (err := capsys.readouterr().err) and "anyone with the link" in err


def test_top_up_counts_other_images_skips_partial_files_and_never_deletes(tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "mine.jpg")
    (folder / "class-00000.png.part").write_bytes(b"half a png")  # left by a disconnect
    written = ci.write_blank_images(folder, 3, 64, progress=False)
    assert [p.name for p in written] == ["class-00000.png", "class-00001.png"]
    assert names(folder) == ["class-00000.png", "class-00001.png", "mine.jpg"]
    assert ci.write_blank_images(folder, 2, 64, progress=False) == []  # more than asked: kept
    assert len(list(folder.iterdir())) == 3


# --- count check ---------------------------------------------------------------------------------

def test_count_check_fewer_equal_more(make_config):
    config = make_config(with_prior_preservation=True)
    ci.write_blank_images(ci.class_folder(config), 5, 64, progress=False)

    fewer = ci.check_class_images(config.replace(num_class_images=8))
    assert (fewer.have, fewer.wanted, fewer.missing, fewer.ok) == (5, 8, 3, False)
    assert "num_class_images is 8" in fewer.message and "holds 5" in fewer.message
    with pytest.raises(ci.ClassImagesError, match="num_class_images is 8 but .* holds 5"):
        ci.ensure_class_images(config.replace(num_class_images=8))

    equal = ci.ensure_class_images(config)
    assert (equal.have, equal.wanted, equal.ok) == (5, 5, True) and "5 in" in equal.message

    more = ci.ensure_class_images(config.replace(num_class_images=3))
    assert more.ok and "using the first 3 of 5" in more.message
    assert len(list(ci.class_folder(config).glob("*.png"))) == 5  # nothing deleted

    assert ci.ensure_class_images(config.replace(with_prior_preservation=False)) is None


def test_count_check_of_an_empty_folder_names_it(make_config):
    status = ci.check_class_images(make_config())
    assert (status.have, status.ok) == (0, False) and str(ci.class_folder(make_config())) in status.message


def test_ensure_with_fill_generates_the_rest(make_config, loads):
    config = make_config(with_prior_preservation=True, num_class_images=4)
    ci.write_blank_images(ci.class_folder(config), 2, 64, progress=False)
    status = ci.ensure_class_images(config, fill=True, progress=False)
    assert (status.have, status.ok) == (4, True) and len(loads) == 1
    generated = Image.open(ci.class_folder(config) / "class-00003.png")
    assert generated.mode == "RGB" and "Seed: 3," in generated.text["parameters"]


# --- import --------------------------------------------------------------------------------------

def source_folder(tmp_path):
    source = tmp_path / "source"
    (source / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(source / "sub" / "x.png")
    (source / "sub" / "x.txt").write_text("1girl, red")
    Image.new("RGB", (16, 16), "blue").save(source / "y.jpg")
    Image.new("P", (16, 16)).save(source / "z.gif")
    (source / "notes.md").write_text("not a picture")
    return source


def test_import_from_a_folder_flattens_and_reruns_without_duplicates(make_config, tmp_path):
    config = make_config(class_images_mode="import", num_class_images=0,
                         class_images_import=str(source_folder(tmp_path)))
    with pytest.warns(UserWarning, match="notes.md"):
        status = ci.make_class_images(config, progress=False)
    folder = ci.class_folder(config)
    assert names(folder) == ["sub_x.png", "sub_x.txt", "y.jpg", "z.gif"]  # the trainer reads GIFs too
    assert (folder / "sub_x.txt").read_text() == "1girl, red"
    assert (status.have, status.wanted, status.ok) == (3, 3, True) and "num_class_images=3" in status.message
    with pytest.warns(UserWarning):
        ci.make_class_images(config, progress=False)
    assert len(names(folder)) == 4


def test_import_from_a_zip_and_bad_sources(make_config, tmp_path):
    archive = tmp_path / "class.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(3):
            Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
            zf.write(tmp_path / f"{i}.png", f"{i}.png")
    status = ci.make_class_images(make_config(class_images_mode="import", class_images_import=str(archive)))
    assert (status.have, status.wanted, status.ok) == (3, 5, False) and "Generate the missing 2" in status.message
    assert "class_images_mode=generate" in status.message  # rerunning the import would not help
    with pytest.raises(ci.ClassImagesError, match="class_images_import .*nope"):
        ci.make_class_images(make_config(class_images_mode="import", class_images_import=str(tmp_path / "nope")))
