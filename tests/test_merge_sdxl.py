"""Merging SDXL models (issue 33, item 3) on the tiny SDXL (CPU): the arithmetic on single files and
diffusers folders, a result diffusers reads back, and the inputs that do not merge (two families, a
v-prediction model with an epsilon one)."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dbnb.family.base import for_model
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.sdxl import layout
from dbnb.family.sdxl.family import SDXL
from dbnb.family.sdxl.load import sampling_of
from dbnb.family.sdxl.load import FINGERPRINT_PARTS
from dbnb.ship.merge import MergeError, merge

CONV_IN = layout.UNET + "input_blocks.0.0.weight"


def _perturbed(tiny_sdxl, folder, seed: int):
    """A copy of the tiny SDXL whose every weight is moved by seeded noise: a distinct model."""
    shutil.copytree(tiny_sdxl, folder)
    generator = torch.Generator().manual_seed(seed)
    for part in FINGERPRINT_PARTS:
        for file in (folder / part).glob("*.safetensors"):
            state = load_file(file)
            save_file({k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                       for k, v in state.items()}, file)
    return folder


def _single_file(folder, path, **extra):
    """The folder as SDXL's single file (the layout the export writes), with `extra` keys added."""
    parts = {part: load_file(next((folder / part).glob("*.safetensors"))) for part in FINGERPRINT_PARTS}
    encoder = {f"{name}.{k}": v for name, part in zip(layout.ENCODERS, ("text_encoder", "text_encoder_2"))
               for k, v in parts[part].items()}
    state = SDXL.single_file.state_dict(parts["unet"], parts["vae"], encoder, base=str(folder))
    return SDXL.single_file.write(path, {k: v.contiguous() for k, v in state.items()} | extra)


@pytest.fixture(scope="module")
def xl(tiny_sdxl, tmp_path_factory):
    """Three distinct tiny SDXL models, each as a diffusers folder and a single file."""
    root = tmp_path_factory.mktemp("merge-sdxl")
    folders = [_perturbed(tiny_sdxl, root / f"x{seed}", seed) for seed in range(3)]
    return [_single_file(f, root / f"x{seed}.safetensors") for seed, f in enumerate(folders)], folders


def run(inputs, tmp_path, **kw):
    kw.setdefault("out_file", tmp_path / "merged.safetensors")
    kw.setdefault("dtype", "fp32")
    return merge([str(i) for i in inputs], progress=False, **kw)


def test_weighted_sum_of_files_is_the_arithmetic_and_reads_back_as_sdxl(xl, tmp_path, monkeypatch):
    files, _ = xl
    monkeypatch.setattr("dbnb.family.sd1.singlefile.REOPEN_BYTES", 100_000)  # reopen the inputs every few tensors
    result = run(files, tmp_path, weights=[5, 2.7, 2], out_dir=tmp_path / "folder")
    sds = [load_file(f) for f in files]
    w = [5 / 9.7, 2.7 / 9.7, 2 / 9.7]
    got = load_file(result.file)
    assert got.keys() == sds[0].keys()
    for k, v in sds[0].items():
        want = v if k == layout.POSITION_IDS else sum(wi * sd[k] for wi, sd in zip(w, sds))
        torch.testing.assert_close(got[k], want, msg=k)
    assert got[layout.POSITION_IDS].dtype == torch.int64
    with safe_open(result.file, "pt") as f:
        assert f.metadata()["dbnb_merge_recipe"] == "x0 5, x1 2.7, x2 2"
    sidecar = json.loads(result.file.with_suffix(".json").read_text())
    assert sidecar["dbnb_merge"]["short_hash"] == result.short_hash
    back = SDXL.single_file.read_back(result.file, *keys_and_shapes(result.file), torch.float32)
    assert torch.equal(back.denoiser.conv_in.weight, got[CONV_IN])
    assert set(back.encoder) == {"te1", "te2"}
    assert for_model(str(result.folder)) is SDXL  # the diffusers folder it also wrote is SDXL's
    assert json.loads((result.folder / "dbnb_merge.json").read_text())["recipe"] == result.recipe


def test_add_difference_of_folders_is_the_arithmetic_on_their_files(xl, tmp_path):
    files, folders = xl
    result = run(folders, tmp_path, mode="add_difference", alpha=0.4, dtype="fp16")
    a, b, c = (load_file(f) for f in files)
    got = load_file(result.file)
    assert got.keys() == a.keys()
    for k, v in a.items():
        want = v if k == layout.POSITION_IDS else (v + (b[k] - c[k]) * 0.4).half()
        assert torch.equal(got[k], want), k
    mixed = run([folders[0], files[1]], tmp_path / "mixed", weights=[0.3, 0.7])  # a folder with a file
    from_files = run(files[:2], tmp_path / "files", weights=[0.3, 0.7])
    assert load_file(mixed.file).keys() == load_file(from_files.file).keys()
    for k, v in load_file(from_files.file).items():
        assert torch.equal(load_file(mixed.file)[k], v), k


def test_models_of_two_families_are_refused_naming_both(xl, tiny_dir, tmp_path):
    files, _ = xl
    with pytest.raises(MergeError, match=r"x0 is an SDXL model and tiny\w* is an SD 1.x model"):
        run([files[0], tiny_dir], tmp_path, labels=["x0", "tiny"])
    assert not (tmp_path / "merged.safetensors").exists()


def test_v_prediction_markers_are_kept_when_all_have_them_and_a_mix_is_refused(xl, tmp_path):
    files, folders = xl
    markers = layout.markers("v_prediction", True)
    vpred = [_single_file(f, tmp_path / f"v{i}.safetensors", **markers) for i, f in enumerate(folders[:2])]
    result = run(vpred, tmp_path / "v")
    assert sampling_of(str(result.file)) == ("v_prediction", True)
    back = SDXL.single_file.read_back(result.file, *keys_and_shapes(result.file), torch.float32)
    assert back.pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(MergeError, match=r"v0: v-prediction with zero terminal SNR, x1: epsilon"):
        run([vpred[0], files[1]], tmp_path / "mix")
    no_ztsnr = _single_file(folders[1], tmp_path / "vn.safetensors", **layout.markers("v_prediction", False))
    with pytest.raises(MergeError, match=r"vn: v-prediction\)"):
        run([vpred[0], no_ztsnr], tmp_path / "mix")
