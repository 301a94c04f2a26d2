"""Damaged and wrong weight files, in every command that reads one: a `dbnb:` line naming
the file and the fix, never a library traceback that names none."""
import shutil

import pytest
import torch
from conftest import two_checkpoint_run
from safetensors.torch import save_file

from dbnb.core import weights
from dbnb.core.weights import UnsafeCheckpointError, WeightFileError
from dbnb.faces.cli import main


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    return two_checkpoint_run(tiny_dir, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def single_file(tiny_dir, tmp_path_factory):
    from dbnb.world.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    make_tiny_model(path.parent / "folder", single_file=path)
    return path


def test_the_reader_names_the_file_and_what_is_wrong(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(1000.0)}, str(good))
    assert torch.equal(weights.read_state_dict(good)["a"], torch.arange(1000.0))
    cut = tmp_path / "cut.safetensors"
    shutil.copy(good, cut)
    truncate(cut)
    with pytest.raises(WeightFileError, match=r"cut.safetensors is damaged or incomplete .*download it again"):
        weights.read_state_dict(cut)
    with pytest.raises(WeightFileError, match="cut.safetensors is damaged"):
        weights.check(cut)
    torch.save({"state_dict": {"a": torch.arange(1000.0)}}, tmp_path / "good.ckpt")
    shutil.copy(tmp_path / "good.ckpt", tmp_path / "cut.ckpt")
    truncate(tmp_path / "cut.ckpt")
    for call in (weights.read_state_dict, weights.check):
        with pytest.raises(WeightFileError, match="cut.ckpt is damaged or incomplete"):
            call(tmp_path / "cut.ckpt")
    # a legacy (non-zip) pickle cut short
    torch.save({"a": torch.arange(1000.0)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    truncate(tmp_path / "old.pt")
    with pytest.raises(WeightFileError, match="old.pt is damaged"):
        weights.read_state_dict(tmp_path / "old.pt")
    # a web page saved as a model: "not a checkpoint", not "asks to run code"
    for name in ("page.ckpt", "page.safetensors"):
        (tmp_path / name).write_text("<html><body>Sign in to continue</body></html>")
        for call in (weights.read_state_dict, weights.check):
            with pytest.raises(WeightFileError, match=f"{name} is not a checkpoint") as e:
                call(tmp_path / name)
            assert not isinstance(e.value, UnsafeCheckpointError)
    with pytest.raises(WeightFileError, match="does not exist"):
        weights.read_state_dict(tmp_path / "gone.ckpt")


def _fails_clearly(capsys, argv, *names):
    assert main(argv) == 2
    full = capsys.readouterr().err
    err = full.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("dbnb: ") and "Traceback" not in full and "SafetensorError" not in err, full
    for name in names:
        assert name in err, err
    return err


def test_convert_and_merge_name_the_damaged_file(single_file, tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    shutil.copy(single_file, cut)
    truncate(cut)
    _fails_clearly(capsys, ["convert", str(cut), str(tmp_path / "out")], str(cut), "damaged")
    assert not (tmp_path / "out").exists()
    page = tmp_path / "page.ckpt"
    page.write_text("404 Not Found")
    _fails_clearly(capsys, ["convert", str(page), str(tmp_path / "out")], str(page), "not a checkpoint")
    _fails_clearly(capsys, ["merge", str(single_file), str(cut), "--out", str(tmp_path / "m.safetensors")],
                   str(cut), "damaged")
    assert not (tmp_path / "m.safetensors").exists()


def test_sample_and_export_name_the_damaged_checkpoint_file(run_dir, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    unet = run / "checkpoints" / "step-000002" / "unet" / "diffusion_pytorch_model.safetensors"
    truncate(unet)
    _fails_clearly(capsys, ["export", str(run)], str(unet), "damaged")
    assert not list(run.glob("exports/*.safetensors"))
    _fails_clearly(capsys, ["sample", str(run), "test_seeds=1", "test_infer_steps=1", "--no-progress"],
                   str(unet), "damaged")
    # a damaged base model folder is named too (diffusers' own error names no file)
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    vae = truncate(model / "vae" / "diffusion_pytorch_model.safetensors")
    _fails_clearly(capsys, ["export", str(model), "--to", str(tmp_path / "out")], str(vae), "damaged")
