"""What a checkpoint costs on disk: fp16 weights for every save, the fp32 master only in the
resume state, and the disk plan that checks a whole run before its first step."""
import shutil

import pytest
import torch
from safetensors import safe_open

from dbnb.core.disk import DiskFullError
from dbnb.run.checkpoints import CheckpointError, dir_size
from dbnb.run.folder import RunFolder
from dbnb.train.diskplan import count_saves
from dbnb.train.loop import train

GB = 1 << 30


def dtypes(path):
    with safe_open(str(path), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def master(run_dir, step, name="unet"):
    from safetensors.torch import load_file
    return load_file(RunFolder(run_dir).pick(step).path / "state" / f"{name}.safetensors")


def test_every_save_keeps_fp16_weights_and_only_the_resume_state_the_fp32_master(make_config):
    result = train(make_config(max_train_steps=3, save_every_steps=1, keep_last_n=1, use_ema=True,
                               ema_decay=0.5, train_text_encoder=True), progress=False)
    run = RunFolder(result.run_dir)
    old, new = run.pick(2), run.pick(3)
    for part in ("unet/diffusion_pytorch_model", "unet_ema/diffusion_pytorch_model", "text_encoder/model"):
        assert dtypes(new.path / f"{part}.safetensors") == {"F16"}, part
        assert dtypes(old.path / f"{part}.safetensors") == {"F16"}, part
    for name in ("unet", "unet_ema", "text_encoder"):
        assert dtypes(new.path / "state" / f"{name}.safetensors") == {"F32"}, name
    assert not (old.path / "state").exists()  # keep_last_n pruned the master with the rest
    # the weights are the master, rounded: what the run trained, at half the size
    weights, full = new.denoiser_state(), master(result.run_dir, 3)
    assert weights.keys() == full.keys()
    assert all(torch.equal(weights[k], full[k].half()) for k in full)
    assert dir_size(new.path / "unet") < 0.55 * (new.path / "state" / "unet.safetensors").stat().st_size


def test_a_resume_continues_from_the_fp32_master_exactly(make_config):
    settings = dict(save_every_steps=2, use_ema=True, ema_decay=0.5)
    straight = train(make_config(max_train_steps=4, run_name="straight", **settings), progress=False)
    half = make_config(max_train_steps=2, run_name="halves", **settings)
    train(half, progress=False)
    resumed = train(half.replace(max_train_steps=4), resume="latest", progress=False)
    for name in ("unet", "unet_ema"):
        a, b = master(straight.run_dir, 4, name), master(resumed.run_dir, 4, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # bit for bit: not through fp16


def test_a_checkpoint_from_before_the_master_copy_still_resumes(make_config):
    # Until 2026-12 unet/ held the fp32 weights and the state had no copy of them.
    half = make_config(max_train_steps=2, save_every_steps=2)
    result = train(half, progress=False)
    checkpoint = RunFolder(result.run_dir).pick(2).path
    shutil.move(checkpoint / "state" / "unet.safetensors", checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    resumed = train(half.replace(max_train_steps=3), resume="latest", progress=False)
    assert resumed.step == 3


def test_half_precision_weights_without_their_master_are_not_resumed_from(make_config):
    half = make_config(max_train_steps=2, save_every_steps=2)
    result = train(half, progress=False)
    (RunFolder(result.run_dir).pick(2).path / "state" / "unet.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no fp32 master copy of unet .*unet.safetensors is missing"):
        train(half.replace(max_train_steps=3), resume="latest", progress=False)


def test_the_plan_is_what_the_run_writes(make_config, capsys):
    config = make_config(max_train_steps=4, save_every_steps=2, keep_last_n=1)
    result = train(config, progress=False)
    printed = [ln for ln in capsys.readouterr().out.splitlines() if "disk plan:" in ln]
    assert printed and "2 save(s)" in printed[0], printed
    from dbnb.family.sd1.load import load_pipeline
    from dbnb.train import diskplan
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    pipe.unet.requires_grad_(True)
    plan = diskplan.plan(config, pipe.unet, pipe.text_encoder, pipe.vae, "AdamW", 0, 4,
                         RunFolder(result.run_dir / "elsewhere"))
    checkpoint = RunFolder(result.run_dir).pick(4).path
    weights, state = dir_size(checkpoint) - dir_size(checkpoint / "state"), dir_size(checkpoint / "state")
    assert plan.weights <= weights <= plan.weights * 1.05 + (1 << 16), (plan.weights, weights)
    assert plan.state <= state <= plan.state * 1.05 + (1 << 16), (plan.state, state)


def test_a_run_whose_saves_would_fill_the_disk_stops_before_its_first_step(make_config):
    # Ten million steps, a save after each: no disk holds that, and nothing has trained yet.
    config = make_config(max_train_steps=10_000_000, save_every_steps=1)
    with pytest.raises(DiskFullError, match=r"(?s)Disk plan for run 'run': 10000000 save\(s\) .* is free at .*"
                                            r"Settings that fit: save_every_steps=0 \(one save, at the end\)"):
        train(config, progress=False)
    assert not RunFolder.for_config(config).checkpoints()


def sd15_on_meta():
    """SD 1.5's three models from the shipped configs, shapes only (no memory)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dbnb.family.sd1.skeleton import skeleton_config
    with torch.device("meta"):
        pipe = SimpleNamespace(unet=UNet2DConditionModel.from_config(skeleton_config("unet")),
                               vae=AutoencoderKL.from_config(skeleton_config("vae")),
                               text_encoder=CLIPTextModel(CLIPTextConfig(**skeleton_config("text_encoder"))))
    pipe.text_encoder.requires_grad_(False)
    return pipe


def test_the_default_sd15_run_and_what_the_plan_offers_on_a_free_drive(tmp_path):
    from dbnb.core.config import Config
    from dbnb.train import diskplan

    # the defaults: 3000 steps, a save every 500, 8-bit Adam, the text encoder trained (as train() sets it up)
    config = Config(output_dir=str(tmp_path))
    pipe = sd15_on_meta()
    pipe.text_encoder.requires_grad_(config.fine_tunes_text_encoder)
    default = diskplan.plan(config, pipe.unet, pipe.text_encoder, pipe.vae, "AdamW8bit", 0, config.max_train_steps,
                            RunFolder(tmp_path))
    assert default.saves == 6 and default.keep_last_n == 1
    assert 1.8 * GB < default.weights < 1.85 * GB   # 859.5 M UNet + 123.1 M text encoder values in fp16
    assert 5.5 * GB < default.state < 5.55 * GB     # fp32 master + two 8-bit moments
    assert 22 * GB < default.need < 22.1 * GB       # during the last save: 6 weights + 2 states
    assert diskplan.fitting(default, 15 * GB) == "Settings that fit: save_every_steps=1500 (2 saves)."
    # the UNet alone (train_text_encoder=false)
    sd15 = sd15_on_meta()
    unet_only = diskplan.plan(config.replace(train_text_encoder=False), sd15.unet, sd15.text_encoder, sd15.vae,
                              "AdamW8bit", 0, config.max_train_steps, RunFolder(tmp_path))
    assert 1.55 * GB < unet_only.weights < 1.65 * GB and 4.75 * GB < unet_only.state < 4.85 * GB
    assert 19 * GB < unet_only.need < 19.5 * GB
    assert diskplan.fitting(unet_only, 15 * GB) == "Settings that fit: save_every_steps=1000 (3 saves)."


@pytest.mark.parametrize("start, end, every, saves", [(0, 3000, 500, 6), (0, 3001, 500, 7), (0, 10, 0, 1),
                                                       (2500, 3000, 500, 1), (2600, 3000, 500, 1),
                                                       (3000, 3000, 500, 0), (0, 5, 1, 5)])
def test_count_saves_matches_the_loop(start, end, every, saves):
    assert count_saves(start, end, every) == saves
    looped = sum(1 for step in range(start + 1, end + 1) if (every and step % every == 0) or step == end)
    assert looped == saves
