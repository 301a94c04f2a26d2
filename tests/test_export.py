"""Export on the tiny model: files the webui's loaders read back exactly."""
import json

import pytest
import torch
from safetensors import safe_open

from dbnb.core.config import Config
from dbnb.core.disk import DiskFullError
from dbnb.family.sd1.load import load_checkpoint_file, load_pipeline
from dbnb.run.checkpoints import CheckpointError
from dbnb.run.folder import RunFolder
from dbnb.ship import export as export_mod
from dbnb.ship.export import ExportError, convert, export
from dbnb.train.loop import train
from dbnb.world.demo import write_dataset


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-run")
    instance, _ = write_dataset(root / "data", n_instance=2)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt="hnzk girl", output_dir=str(root / "runs"), run_name="hnzk", resolution=64,
                    max_train_steps=3, save_every_steps=2, learning_rate=1e-3, mixed_precision="no",
                    use_8bit_adam=False, gradient_checkpointing=False, use_ema=True, ema_decay=0.5,
                    train_text_encoder=True, text_encoder_lr=1e-3)
    return train(config, progress=False).run_dir


def checkpoint_weights(run_dir, step, name, ema=False):
    checkpoint = RunFolder(run_dir).pick(step)
    return checkpoint.encoder_state() if name == "text_encoder" else checkpoint.denoiser_state(ema)


@pytest.mark.parametrize("fmt, precision, ema", [
    ("safetensors", "fp16", False), ("safetensors", "fp32", True), ("ckpt", "fp32", False), ("ckpt", "fp16", True)])
def test_export_reads_back_equal_to_the_runs_weights(run_dir, fmt, precision, ema):
    result = export(run_dir, fmt=fmt, precision=precision, ema=ema, overwrite=True)
    assert result.verified and result.step == 3
    assert result.path == run_dir / "exports" / f"hnzk_3{'_ema' if ema else ''}.{fmt}"
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
    pipe = load_pipeline(str(result.path), dtype=dtype)
    for name, part in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        want = checkpoint_weights(run_dir, 3, name, ema)
        got = part.state_dict()
        for k, v in want.items():
            assert torch.equal(got[k], v.to(dtype)), f"{name}.{k}"


# Original SD 1.x names (CompVis ldm / the webui), written out here rather than taken from
# dbnb.family.sd1.layout's maps: a wrong rule in the maps would otherwise be checked against itself.
# Value: the shape's rank where it tells the layouts apart (1x1 convs where diffusers has linears).
SD1_KEYS = {
    "model.diffusion_model.time_embed.0.weight": 2,
    "model.diffusion_model.input_blocks.0.0.weight": 4,
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": 4,
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": 4,
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": 2,
    "model.diffusion_model.input_blocks.3.0.op.weight": 4,
    "model.diffusion_model.input_blocks.7.0.skip_connection.weight": 4,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": 2,
    "model.diffusion_model.middle_block.2.out_layers.3.weight": 4,
    "model.diffusion_model.output_blocks.2.1.conv.weight": 4,
    "model.diffusion_model.output_blocks.5.2.conv.weight": 4,
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": 2,
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": 4,
    "model.diffusion_model.out.2.weight": 4,
    "first_stage_model.encoder.conv_in.weight": 4,
    "first_stage_model.encoder.down.0.downsample.conv.weight": 4,
    "first_stage_model.encoder.mid.attn_1.q.weight": 4,
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": 4,
    "first_stage_model.decoder.up.3.upsample.conv.weight": 4,
    "first_stage_model.decoder.norm_out.weight": 1,
    "first_stage_model.quant_conv.weight": 4,
    "first_stage_model.post_quant_conv.weight": 4,
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": 2,
    "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight": 2,
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": 1,
}
# SD 1.5's file has 686 UNet and 248 VAE keys, and 196 text-encoder ones (12 layers x 16 + 4,
# position_ids aside). The tiny model has the same blocks, fewer only where its widths do not
# change: no skip_connection at input_blocks.4.0 (UNet 686 - 2), no nin_shortcut at all (VAE
# 248 - 8), and 2 text layers (2 x 16 + 4).
TINY_KEY_COUNTS = {"unet": 684, "vae": 240, "text_encoder": 36}


def test_exported_keys_are_the_original_sd_names(run_dir, tiny_dir):
    path = export(run_dir, step=2, overwrite=True).path
    with safe_open(path, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        ranks = {k: len(f.get_slice(k).get_shape()) for k in SD1_KEYS if k in keys}
    assert ranks == SD1_KEYS
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.transformer.text_model."}
    assert {part: sum(k.startswith(p) for k in keys) for part, p in prefixes.items()} == TINY_KEY_COUNTS
    assert len(keys) == sum(TINY_KEY_COUNTS.values())  # nothing outside the three parts
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "attentions", "resnets", "conv_shortcut")
    assert not [k for k in keys if any(w in k for w in diffusers_words)]
    assert meta["global_step"] == "2" and meta["dbnb_instance_prompt"] == "hnzk girl"
    assert meta["dbnb_resolution"] == "64" and meta["dbnb_version"]
    # the base model by its folder's name: a shared file must not show the user's local path
    assert tiny_dir.is_absolute() and meta["dbnb_base_model"] == tiny_dir.name


def test_ckpt_is_a_plain_state_dict_with_global_step(run_dir):
    path = export(run_dir, fmt="ckpt", precision="fp32", overwrite=True).path
    raw = torch.load(path, weights_only=True)
    assert raw["global_step"] == 3 and isinstance(raw["state_dict"], dict)
    assert not any("optimizer" in k or "ema" in k.lower() for k in raw["state_dict"])
    assert len(load_checkpoint_file(path)) == len(raw["state_dict"])


def test_never_silently_overwrites(run_dir, tmp_path):
    out = tmp_path / "out"
    first = export(run_dir, to=str(out))
    second = export(run_dir, to=str(out))
    assert (first.path.name, second.path.name) == ("hnzk_3.safetensors", "hnzk_3-2.safetensors")
    again = export(run_dir, to=str(out), overwrite=True)
    assert again.path == first.path and len(list(out.iterdir())) == 2


def test_full_destination_fails_clearly_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1024, 1024))
    with pytest.raises(DiskFullError, match="exported model") as caught:
        export(run_dir, to=str(tmp_path / "full"))
    assert list((tmp_path / "full").iterdir()) == []
    assert "--to PATH" in str(caught.value) and "export_to" in str(caught.value)
    assert "keep_last_n" not in str(caught.value) and "output_dir" not in str(caught.value)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_a_disk_that_fills_during_the_export_is_named_with_another_target_and_leaves_nothing(
        run_dir, tmp_path, monkeypatch, capsys, fmt):
    """The free-space check passes, then the disk fills while the file is written: safetensors
    says so in a SafetensorError, the .ckpt's zip writer in an OSError (ENOSPC)."""
    import errno
    import os

    import safetensors.torch
    from safetensors import SafetensorError

    from dbnb.faces.cli import main
    from dbnb.family.sd1 import layout

    def full(tensors, filename, *args, **kwargs):
        open(filename, "wb").write(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_zip(self, name, data):
        self._file.write(b"half a record")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(layout._WebuiCkptArchive, "_write", full_zip)
    target = tmp_path / "small-disk"
    assert main(["export", str(run_dir), "--to", str(target), "--format", fmt]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dbnb: Disk full at {target} while writing the export hnzk_3.{fmt}")
    assert "--to PATH" in err and "export_to" in err and "keep_last_n" not in err and "Traceback" not in err
    assert list(target.iterdir()) == []  # no half file, hidden or not


def test_the_runs_folder_given_instead_of_a_run_lists_its_runs_and_what_to_type(run_dir, tmp_path, capsys):
    from dbnb.faces.cli import main

    runs = run_dir.parent
    (runs / "fresh" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (runs / "fresh" / "config.json").write_text((run_dir / "config.json").read_text())
    (runs / "notes").mkdir(exist_ok=True)  # not a run: not listed
    try:
        assert main(["export", str(runs), "--to", str(tmp_path / "out")]) == 2
    finally:
        import shutil
        shutil.rmtree(runs / "fresh"), shutil.rmtree(runs / "notes")
    err = capsys.readouterr().err
    assert err.startswith(f"dbnb: {runs} holds run folders, not a run: fresh (no checkpoint yet), "
                          "hnzk (newest checkpoint: step 3).")
    assert f"`dbnb export {run_dir}`" in err and "Traceback" not in err and "model_index.json" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_destination_fails_clearly(run_dir, tmp_path):
    (tmp_path / "a-file").write_text("x")
    from dbnb.core.disk import NotWritableError

    with pytest.raises(NotWritableError, match="Cannot write the exported model to .*a-file"):
        export(run_dir, to=str(tmp_path / "a-file" / "exports"))


def test_a_killed_exports_hidden_half_file_is_removed_by_the_next_export(run_dir, tmp_path):
    import os
    import time

    out = tmp_path / "out"
    out.mkdir()
    killed = out / ".hnzk_3.safetensors.0123abcd.tmp"  # what write_single_file names it while writing
    killed.write_bytes(b"\0" * 1000)
    long_ago = time.time() - 3600
    os.utime(killed, (long_ago, long_ago))
    writing = out / ".other.safetensors.89abcdef.tmp"  # another export still writing: left alone
    writing.write_bytes(b"\0")
    export(run_dir, to=str(out), precision="fp32")
    assert not killed.exists() and writing.exists()


def test_convert_into_an_unwritable_folder_says_so_before_loading(tiny_dir, tmp_path, capsys):
    from dbnb.faces.cli import main

    (tmp_path / "a-file").write_text("x")
    assert main(["convert", str(tmp_path / "missing.safetensors"), str(tmp_path / "a-file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbnb: Cannot write the diffusers folder to ") and "a-file" in err


def test_a_file_that_does_not_verify_is_removed(run_dir, tmp_path, monkeypatch):
    from dbnb.family.sd1.family import SD1

    real = SD1.single_file.state_dict

    def drops_a_key(*parts, **options):
        state = real(*parts, **options)
        state.pop("model.diffusion_model.out.2.bias")
        return state
    monkeypatch.setattr(SD1.single_file, "state_dict", drops_a_key)
    with pytest.raises(ExportError, match="keys missing"):
        export(run_dir, to=str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_missing_ema_or_step_say_what_to_do(run_dir, tmp_path):
    with pytest.raises(CheckpointError, match="saved steps: 2, 3"):
        export(run_dir, step=7)
    with pytest.raises(ExportError, match="safetensors or ckpt"):
        export(run_dir, fmt="pt")


def test_a_model_folder_exports_and_a_single_file_converts_back(tiny_dir, tmp_path):
    exported = export(str(tiny_dir), precision="fp32", to=str(tmp_path / "out"))
    folder = convert(exported.path, tmp_path / "converted")
    a, b = load_pipeline(str(tiny_dir)), load_pipeline(str(folder))
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("position_ids"))
    assert json.loads((folder / "dbnb_source.json").read_text())["converted_from"] == str(exported.path)


def test_hub_upload_goes_to_a_private_repo(tmp_path):
    calls = []

    class Api:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_file(self, **kw):
            calls.append(("upload", kw["repo_id"], kw["path_in_repo"]))
    (tmp_path / "m.safetensors").write_bytes(b"x")
    url = export_mod.upload_to_hub(tmp_path / "m.safetensors", "me/hnzk", api=Api())
    assert calls[0][2]["private"] is True and calls[1:] == [("upload", "me/hnzk", "m.safetensors")]
    (tmp_path / "README.md").write_text("---\nlicense: x\n---\n")
    calls.clear()
    export_mod.upload_to_hub(tmp_path / "m.safetensors", "me/hnzk", api=Api())
    assert calls[-1] == ("upload", "me/hnzk", "README.md")
    assert url.endswith("me/hnzk/blob/main/m.safetensors")
