"""The trainer on the tiny model, on CPU: real training runs, nothing mocked."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbnb.core.config import Config, ConfigError
from dbnb.data import dataset as data
from dbnb.data.batches import MicroBatch, read_images
from dbnb.family.sd1.family import SD1
from dbnb.run.checkpoints import RunFolder, RunFolderError
from dbnb.train.loop import TrainingError, diffusion_loss, train


def unet_weights(run_dir, step, ema=False):
    return RunFolder(run_dir).pick(step).denoiser_state(ema)


def fixed_loss(config, unet_state=None):
    """Mean training-set loss at fixed noise and timesteps (the same for every call)."""
    from dbnb.family.sd1.load import load_pipeline

    pipe = load_pipeline(config.pretrained_model_name_or_path)
    if unet_state is not None:
        pipe.unet.load_state_dict(unet_state)
    batches = read_images(config.replace(with_prior_preservation=False), pipe.tokenizer)
    with torch.no_grad():
        latents = pipe.vae.encode(data.unit_range(batches.instance.images)).latent_dist.mean
        losses = [diffusion_loss(pipe.unet, pipe.text_encoder, _ddpm(pipe),
                                 MicroBatch(latents, {"input_ids": batches.instance.input_ids},
                                            torch.Generator().manual_seed(k)),
                                 config.replace(with_prior_preservation=False), family=SD1,
                                 scaling_factor=pipe.vae.config.scaling_factor).item() for k in range(8)]
    return sum(losses) / len(losses)


def _ddpm(pipe):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(pipe.scheduler.config)


def test_training_lowers_the_loss_on_the_training_set(make_config):
    config = make_config(max_train_steps=40, learning_rate=5e-4, train_batch_size=2)
    before = fixed_loss(config)
    result = train(config, progress=False)
    after = fixed_loss(config, unet_weights(result.run_dir, 40))
    assert result.step == 40 and not result.cancelled
    print(f"fixed-noise training loss: before {before:.4f}, after {after:.4f}")
    assert after <= 0.5 * before, (before, after)
    log = [json.loads(line) for line in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved.pop("run_id") and saved.pop("dbnb_version").startswith("dbnb ") and saved == config.to_dict()


def test_prior_preservation_adds_the_weighted_class_term(make_config):
    from dbnb.family.sd1.load import load_pipeline

    pipe = load_pipeline(make_config().pretrained_model_name_or_path)
    config = make_config(with_prior_preservation=True, num_class_images=6)
    batches = read_images(config, pipe.tokenizer)
    assert len(batches.klass) == 6 and batches.epoch_len == 6
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([batches.instance.input_ids[:1], batches.klass.input_ids[:1]])

    def loss(**kw):
        c = config.replace(**kw)
        return diffusion_loss(pipe.unet, pipe.text_encoder, _ddpm(pipe),
                              MicroBatch(latents, {"input_ids": ids}, torch.Generator().manual_seed(1)), c,
                              family=SD1).item()
    instance_only = loss(prior_loss_weight=0.0)
    one, two = loss(prior_loss_weight=1.0), loss(prior_loss_weight=2.0)
    class_term = one - instance_only
    assert class_term > 0
    assert two - one == pytest.approx(class_term, rel=1e-5)


def _text_encoder(run_dir, step):
    return RunFolder(run_dir).pick(step).encoder_state()


def _differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_stop_text_encoder_freezes_it_after_its_fraction_of_the_run(make_config):
    result = train(make_config(max_train_steps=4, save_every_steps=1, train_text_encoder=True,
                               text_encoder_lr=1e-3, stop_text_encoder=0.5), progress=False)
    te = [_text_encoder(result.run_dir, s) for s in range(1, 5)]
    unet = [unet_weights(result.run_dir, s) for s in range(1, 5)]
    assert _differ(te[0], te[1])  # trained for the first half
    assert not _differ(te[1], te[2]) and not _differ(te[2], te[3])  # then frozen
    assert _differ(unet[2], unet[3])  # while the UNet goes on


def test_gradient_accumulation_steps_once_per_group_and_scale_lr_multiplies(make_config):
    result = train(make_config(max_train_steps=3, gradient_accumulation_steps=2, scale_lr=True,
                               save_every_steps=0), progress=False)
    state = result.run_dir / "checkpoints" / "step-000003" / "state"
    assert json.loads((state / "trainer.json").read_text())["micro_step"] == 6
    optimizer = torch.load(state / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {3.0}  # 3 updates from 6 micro-batches
    log = [json.loads(x) for x in (result.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["lr"] == pytest.approx(1e-4 * 1 * 2)  # learning_rate x batch x accumulation x processes


def test_num_train_epochs_sets_the_length_from_the_dataset(make_config):
    # 3 instance images, batch 2: 2 steps an epoch, 3 epochs
    result = train(make_config(num_train_epochs=3, train_batch_size=2, max_train_steps=1), progress=False)
    assert result.step == result.max_steps == 6


def test_without_the_latent_cache_training_computes_the_same(make_config):
    cached = train(make_config(max_train_steps=4, run_name="cached", hflip=True), progress=False)
    live = train(make_config(max_train_steps=4, run_name="live", hflip=True, cache_latents=False), progress=False)
    # the losses tell the batches apart (a missed flip or scaling moves them by far more); Adam
    # turns float noise in near-zero gradients into up to one lr step, so weights only roughly
    losses = [[json.loads(x)["loss"] for x in (r.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
              for r in (cached, live)]
    assert losses[1][:2] == pytest.approx(losses[0][:2], rel=1e-5)  # (nearly) the same weights yet
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    # The batches themselves: the same pictures, flips and noise, latents equal up to the VAE's
    # float noise (a missed flip or scaling is off by far more). Not the weights: Adam turns that
    # noise in near-zero gradients into whole lr steps.
    from dbnb.data.batches import cache_latents, next_batch
    from dbnb.family.sd1.load import load_pipeline

    config = make_config(hflip=True)
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    batches = read_images(config, pipe.tokenizer)
    live_batches = [next_batch(batches, m, config, 0, 1, pipe.vae) for m in range(6)]
    batches.latents = cache_latents(batches, pipe.vae, hflip=True)
    for m, want in enumerate(live_batches):
        got = next_batch(batches, m, config, 0, 1, pipe.vae)
        assert torch.equal(got.inputs["input_ids"], want.inputs["input_ids"])
        torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-5, msg=f"micro-step {m}")


def test_resume_with_a_trained_text_encoder_matches_the_straight_run(make_config):
    settings = dict(save_every_steps=2, train_text_encoder=True, text_encoder_lr=1e-3)
    straight = train(make_config(max_train_steps=4, run_name="straight", **settings), progress=False)
    half = make_config(max_train_steps=2, run_name="halves", **settings)
    train(half, progress=False)
    resumed = train(half.replace(max_train_steps=4), resume="latest", progress=False)
    for load in (unet_weights, _text_encoder):
        a, b = load(straight.run_dir, 4), load(resumed.run_dir, 4)
        assert _differ(load(straight.run_dir, 2), a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_snr_gamma_and_offset_noise_change_the_loss_as_defined(make_config):
    from dbnb.family.sd1.load import load_pipeline

    pipe = load_pipeline(make_config().pretrained_model_name_or_path)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = read_images(make_config(), pipe.tokenizer).instance.input_ids[[0, 1, 2, 0]]

    def loss(scheduler=None, **kw):
        return diffusion_loss(pipe.unet, pipe.text_encoder, scheduler or _ddpm(pipe),
                              MicroBatch(latents, {"input_ids": ids}, torch.Generator().manual_seed(3)),
                              make_config(**kw), family=SD1).item()
    plain = loss()
    # Min-SNR weights are min(SNR, γ) / SNR ≤ 1: a huge γ changes nothing, a small one lowers the loss
    assert loss(snr_gamma=1e9) == pytest.approx(plain, rel=1e-6)
    assert loss(snr_gamma=0.01) < plain and loss(snr_gamma=0.01) <= loss(snr_gamma=0.1) <= plain
    assert loss(offset_noise=0.5) != pytest.approx(plain, rel=1e-3)
    # v-prediction trains towards the velocity, not the noise
    from diffusers import DDPMScheduler
    v = DDPMScheduler.from_config({**pipe.scheduler.config, "prediction_type": "v_prediction"})
    assert loss(v) != pytest.approx(plain, rel=1e-3)


def test_ema_is_saved_and_differs_from_the_raw_weights(make_config):
    result = train(make_config(use_ema=True, ema_decay=0.5, max_train_steps=3), progress=False)
    raw, ema = unet_weights(result.run_dir, 3), unet_weights(result.run_dir, 3, ema=True)
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_keep_last_n_drops_old_resume_states_but_keeps_weights(make_config):
    result = train(make_config(max_train_steps=5, save_every_steps=1, keep_last_n=2), progress=False)
    folders = sorted((result.run_dir / "checkpoints").iterdir())
    assert [f.name for f in folders] == [f"step-{s:06d}" for s in range(1, 6)]
    assert all((f / "unet" / "diffusion_pytorch_model.safetensors").is_file() for f in folders)
    assert [f.name for f in folders if (f / "state").exists()] == ["step-000004", "step-000005"]


def test_nan_guard_names_the_last_checkpoint_that_really_is_good(make_config):
    # the learning rate climbs until the loss turns NaN (step 12 on the tiny model)
    config = make_config(max_train_steps=30, save_every_steps=1, learning_rate=10.0, max_grad_norm=0.0,
                         lr_scheduler="constant_with_warmup", lr_warmup_steps=1000)
    with pytest.raises(TrainingError, match=r"diverged.*learning_rate.*fp16") as e:
        train(config, progress=False)
    run = Path(config.output_dir) / "run" / "checkpoints"
    saved = sorted(os.listdir(run))
    failed_at = int(str(e.value).split(" at step ")[1].split(":")[0])
    assert failed_at > 3 and saved == [f"step-{s:06d}" for s in range(1, failed_at)]
    # the newest checkpoint holds the weights that gave the NaN: the good one is older
    good = run / f"step-{failed_at - 2:06d}"
    assert f"step-{failed_at - 1:06d} holds the weights that led here" in str(e.value)
    assert f"The last good checkpoint is {good}" in str(e.value) and "lower learning_rate" in str(e.value)
    weights = unet_weights(run.parent, failed_at - 2)
    assert all(torch.isfinite(w).all() for w in weights.values())
    # its weights gave the last finite training loss. Not asserted on other batches: this close
    # to divergence they may overflow there (activations ~1e21 into a GroupNorm, diffusers 0.30)
    log = [json.loads(x) for x in (run.parent / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, failed_at))
    assert math.isfinite(log[-1]["loss"])


def _poison_gradients_at(monkeypatch, call):
    """A finite loss whose gradient is NaN at the `call`-th micro-step: 0 * sqrt(0) is 0, its
    derivative 0 * inf."""
    from dbnb.train import loop as train_module

    real, calls = train_module.diffusion_loss, []

    def loss(unet, *args, **kwargs):
        value = real(unet, *args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            w = next(unet.parameters())
            value = value + 0 * torch.sqrt((w - w.detach()).sum())
        return value
    monkeypatch.setattr(train_module, "diffusion_loss", loss)


def test_a_non_finite_gradient_stops_before_the_step_even_without_clipping(make_config, monkeypatch):
    _poison_gradients_at(monkeypatch, 3)
    config = make_config(max_train_steps=5, save_every_steps=1, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"The gradient norm became nan at step 3: training diverged") as e:
        train(config, progress=False)
    run = Path(config.output_dir) / "run"
    assert sorted(os.listdir(run / "checkpoints")) == ["step-000001", "step-000002"]
    assert f"The last good checkpoint is {run / 'checkpoints' / 'step-000001'}" in str(e.value)
    log = [json.loads(x) for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["grad_norm"] > 0 for r in log)  # measured unclipped too


def test_non_finite_weights_are_never_saved(make_config, monkeypatch):
    from dbnb.train import loop as train_module

    real, seen = train_module.diffusion_loss, {}
    monkeypatch.setattr(train_module, "diffusion_loss", lambda unet, *a, **k: seen.setdefault("unet", unet)
                        and real(unet, *a, **k))

    def break_a_weight(record):  # a NaN that reached the weights unseen (e.g. a kernel bug)
        if record["step"] == 2:
            with torch.no_grad():
                next(seen["unet"].parameters()).view(-1)[0] = float("nan")
    config = make_config(max_train_steps=3, save_every_steps=1)
    with pytest.raises(TrainingError, match=r"A value in the UNet weights became inf or NaN at step 2") as e:
        train(config, progress=False, on_step=break_a_weight)
    run = Path(config.output_dir) / "run" / "checkpoints"
    assert os.listdir(run) == ["step-000001"]
    assert f"The last good checkpoint is {run / 'step-000001'}" in str(e.value)


def test_gradient_clipping_really_clips(make_config):
    base = load_file(make_config().pretrained_model_name_or_path + "/unet/diffusion_pytorch_model.safetensors")

    def change(max_grad_norm, name):
        result = train(make_config(max_train_steps=1, max_grad_norm=max_grad_norm, run_name=name), progress=False)
        after = unet_weights(result.run_dir, 1)
        log = json.loads((result.run_dir / "logs" / "train.jsonl").read_text().splitlines()[0])
        return sum((after[k] - base[k]).abs().sum().item() for k in base), log["grad_norm"]
    free, norm_free = change(0.0, "free")
    clipped, norm = change(1e-9, "clipped")
    assert norm_free > 0 and norm > 1e-9  # the pre-clip norm is logged, clipping or not
    assert clipped < 0.1 * free


def test_the_preview_pipeline_has_every_part_on_the_unets_device(tiny_dir):
    """cache_latents parks the VAE on the CPU while the UNet trains on the GPU; previews must
    not mix the two. The meta device stands in for the GPU, so CPU-only CI guards it."""
    from dbnb.family.sd1.load import load_pipeline
    from dbnb.train.previews import preview_pipeline

    pipe = load_pipeline(str(tiny_dir))
    unet = pipe.unet.to("meta")
    sampler, _ = preview_pipeline(SD1, SD1.models_of(pipe), unet)
    modules = {name: part for name, part in sampler.components.items() if isinstance(part, torch.nn.Module)}
    assert set(modules) >= {"unet", "vae", "text_encoder"}
    assert {name: next(m.parameters()).device.type for name, m in modules.items()} == \
        {name: "meta" for name in modules}


def test_settings_that_cannot_work_say_what_to_change(make_config):
    with pytest.raises(ConfigError, match="mixed_precision=no"):
        train(make_config(mixed_precision="fp16"), progress=False)
    with pytest.raises(data.DatasetError, match="num_class_images is 50 but .* holds 6"):
        train(make_config(with_prior_preservation=True, num_class_images=50), progress=False)
    with pytest.raises(data.DatasetError, match="does not exist"):
        train(make_config(instance_data_dir="/nonexistent/images"), progress=False)


def test_the_lr_schedule_is_checked_whole_before_the_first_step(make_config, tmp_path, capsys):
    from dbnb.faces.cli import main
    from dbnb.family.source import ModelLoadError

    # A base model that does not exist: an error about it would mean the model loaded first.
    config = make_config(pretrained_model_name_or_path=str(tmp_path / "no-model"), lr_scheduler="polynomial",
                         lr_warmup_steps=15, max_train_steps=15)  # the case: the default warm-up
    stops = {"warm-up": ({}, r"lr_warmup_steps=15 equals max_train_steps=15: lr_scheduler=polynomial divides .* "
                             r"the run would stop at its last step\. Lower lr_warmup_steps below 15"),
             "epochs": (dict(num_train_epochs=2, lr_warmup_steps=6),  # 3 pictures: 6 steps
                        r"lr_warmup_steps=6 equals the run's 6 steps \(num_train_epochs=2\)"),
             "power": (dict(lr_warmup_steps=0, lr_power=-1.0),
                       r"lr_power=-1 with lr_scheduler=polynomial: the power must be > 0")}
    for case, (overrides, said) in stops.items():
        path = config.replace(**overrides).save(tmp_path / f"{case}.yaml")
        assert main(["train", str(path), "--no-progress"]) == 2, case
        err = capsys.readouterr().err
        assert re.search(said, err) and "Traceback" not in err, (case, err)
    assert not (tmp_path / "runs").exists()  # refused before the run folder was made
    # Runs that would work, but not as set: said before the model loads, then they go on.
    for overrides, said in ((dict(max_train_steps=10, lr_scheduler="constant_with_warmup"),
                             "lr_warmup_steps=15 is not below max_train_steps=10: the learning rate is still rising"),
                            (dict(lr_scheduler="cosine_with_restarts", lr_warmup_steps=10, lr_num_cycles=8),
                             "lr_num_cycles=8 with 5 steps after the warm-up .* at most 5 cycles")):
        with pytest.warns(UserWarning, match=said), pytest.raises(ModelLoadError):
            train(config.replace(**overrides), progress=False)
    # The edges that work: one step after the warm-up, and constant, which has no warm-up.
    for n, fine in enumerate((dict(max_train_steps=2, lr_warmup_steps=1, lr_scheduler="polynomial"),
                              dict(max_train_steps=1, lr_warmup_steps=15, lr_scheduler="constant"))):
        assert train(make_config(**fine, run_name=f"fine{n}"), progress=False).step == fine["max_train_steps"]


def test_bf16_on_a_turing_gpu_is_refused_before_anything_loads(make_config, fake_gpu):
    fake_gpu("Tesla T4", 14.74, (7, 5))  # torch.cuda.is_bf16_supported() says True, as on a real T4
    with pytest.raises(ConfigError, match=r"Tesla T4 \(compute 7\.5\) has no native bf16.*mixed_precision=fp16"):
        train(make_config(mixed_precision="bf16"), progress=False)


def test_out_of_gpu_memory_says_what_to_change_on_a_torch_before_2_5(make_config, monkeypatch):
    import dbnb.train.loop

    # torch < 2.5 has no torch.OutOfMemoryError: naming it in the `except` would raise there,
    # hiding the real error behind an AttributeError
    monkeypatch.delattr(torch, "OutOfMemoryError")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(dbnb.train.loop, "diffusion_loss", out_of_memory)
    with pytest.raises(TrainingError, match="Out of GPU memory at step 1. .*gradient_checkpointing=true"):
        train(make_config(), progress=False)


def test_the_gradient_norm_is_the_same_without_torch_2_6s_get_total_norm(monkeypatch):
    from types import SimpleNamespace

    from dbnb.train.divergence import gradient_norm

    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 70, 5)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.SGD(params, lr=0.1)
    acc = SimpleNamespace(scaler=None)
    expected = float(torch.cat([p.grad for p in params]).norm())
    assert float(gradient_norm(acc, optimizer, max_norm=0)) == pytest.approx(expected, rel=1e-6)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    assert float(gradient_norm(acc, optimizer, max_norm=0)) == pytest.approx(expected, rel=1e-6)


def test_bad_pictures_stop_training_before_the_model_loads_naming_each(make_config, tmp_path):
    folder = tmp_path / "data" / "instance"
    good = sorted(folder.iterdir())
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:200])   # a truncated download
    (folder / "notes.png").write_text("not a picture")
    # a base model that does not exist: an error about it would mean the model loaded first
    config = make_config(pretrained_model_name_or_path=str(tmp_path / "no-model"), max_train_steps=1)
    with pytest.raises(data.DatasetError, match=r"2 of 5 pictures in instance_data_dir .* cannot be used — "
                                                r"cut.png: damaged or truncated.*notes.png: not a picture.*"
                                                r"skip_bad_images=true"):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists()  # no half-made run folder
    with pytest.warns(UserWarning, match="skip_bad_images: training without 2 of 5 pictures"):
        result = train(make_config(skip_bad_images=True, max_train_steps=1), progress=False)
    assert result.step == 1


@pytest.mark.parametrize("problem, match", [
    ("missing", "does not exist"), ("empty", "has no images"), ("only_text", "has no images"),
    ("filewords", r"3 of 3 pictures .* have no caption .*\[filewords\]"),
    ("set.zip", r"set.zip is a .zip, not a folder of pictures. Extract it first: `dbnb prep .*set.zip OUT`"),
    ("nested", r"has no images .*one level down, in .*nested/chara: set instance_data_dir to that folder"),
])
def test_instance_folder_problems_are_found_before_anything_is_made(make_config, tmp_path, problem, match):
    folder = tmp_path / problem
    if problem == "set.zip":  # the pictures as downloaded, not yet extracted
        shutil.make_archive(str(folder.with_suffix("")), "zip", tmp_path / "data" / "instance")
    elif problem != "missing":
        folder.mkdir()
    if problem == "only_text":
        (folder / "caption.txt").write_text("1girl")
    if problem == "nested":  # an archive extracted with its folder
        shutil.copytree(tmp_path / "data" / "instance", folder / "chara")
    overrides = dict(instance_data_dir=str(folder))
    if problem == "filewords":
        overrides = dict(instance_prompt="[filewords]")
    config = make_config(pretrained_model_name_or_path=str(tmp_path / "no-model"), **overrides)
    with pytest.raises(data.DatasetError, match=match):
        train(config, progress=False)
    assert not (tmp_path / "runs").exists()


def test_an_existing_run_needs_resume(make_config, capsys):
    config = make_config(max_train_steps=2, save_every_steps=1, keep_last_n=1)
    train(config, progress=False)
    with pytest.raises(RunFolderError, match="--resume latest"):
        train(config, progress=False)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(config.replace(learning_rate=2e-4, max_train_steps=3), resume="latest", progress=False)
    for steps, said in ((1, "past max_train_steps=1"), (2, "which is max_train_steps=2")):
        with pytest.raises(TrainingError, match=f"already at step 2, {said}; nothing to train"):
            train(config.replace(max_train_steps=steps), resume="latest", progress=False)
    capsys.readouterr()
    result = train(config.replace(max_train_steps=3), resume="latest", progress=False)
    assert result.step == 3
    # said where it starts: the total counts, not the webui extension's "the set steps again from the stop"
    said = capsys.readouterr().out
    assert ("[dbnb] resuming at step 2: max_train_steps=3 is the total of the whole run, so 1 steps are left, "
            "not 3 more as the webui extension would train (to train N more, set max_train_steps=2 + N); saves "
            "stay at multiples of save_every_steps=1 counted from step 0 (next at step 3), not from the stop") in said


def test_the_resume_message_counts_saves_from_step_0():
    from dbnb.core.config import Config
    from dbnb.train.loop import resume_message

    said = resume_message(2000, 3000, Config(save_every_steps=500))
    assert "1000 steps are left, not 3000 more" in said and "(next at step 2500)" in said
    assert "max_train_steps=2000 + N" in said and "『設定したステップ分』" in said
    assert "(next at step 3000)" in resume_message(2900, 3000, Config(save_every_steps=500))
    assert "one save at the end" in resume_message(10, 30, Config(save_every_steps=0))


def _resumed_equals_straight(make_config, name: str, first: dict, then: dict):
    """Train 4 steps straight; train 2 with `first`, resume to 4 with `then`: same UNet weights."""
    straight = train(make_config(max_train_steps=4, run_name=f"{name}-straight", **first), progress=False)
    half = make_config(max_train_steps=2, run_name=name, save_every_steps=2, **first)
    train(half, progress=False)
    resumed = train(half.replace(max_train_steps=4, **then), resume="latest", progress=False)
    a, b = unet_weights(straight.run_dir, 4), unet_weights(resumed.run_dir, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    return resumed


def test_resume_takes_the_changes_dbnb_advises_and_continues_exactly(make_config, capsys):
    """Only what changes what is learnt blocks a resume. The three journeys of a Colab user:"""
    from dbnb.train.memory import memory_advice

    # 1. Out of memory: the advice names gradient_checkpointing, and the resume takes it. 8-bit
    #    Adam would change the optimizer, so the advice says it is for a new run.
    stopped = make_config(gradient_checkpointing=False)
    assert "gradient_checkpointing=true" in memory_advice(stopped)
    assert "use_8bit_adam=true (for a new run: it changes what is learnt)" in memory_advice(stopped)
    _resumed_equals_straight(make_config, "oom", {}, dict(gradient_checkpointing=True))
    assert ("resuming with changed settings: max_train_steps 2 -> 4, gradient_checkpointing False -> True"
            in capsys.readouterr().out)
    # 2. Notebook 05 (test_seeds=2 in the workspace), then 04 again with resume = True.
    _resumed_equals_straight(make_config, "tested", {}, dict(test_seeds=2, sample_steps=3))
    # 3. memory_profile=auto in a session on another GPU tier (here: no GPU, which picks 32-bit
    #    AdamW): the run keeps the optimizer it started with, its state is in the checkpoint.
    _resumed_equals_straight(make_config, "moved", dict(use_8bit_adam=True), dict(memory_profile="auto"))
    assert "Kept from the run being resumed (they change what it learns): use_8bit_adam=true" in capsys.readouterr().out
    # What is learnt still blocks, naming the setting, both values and the way out.
    with pytest.raises(ConfigError, match=r"learning_rate 0.0001 -> 0.0002 .*Set them back to resume"):
        train(make_config(run_name="tested", max_train_steps=4, learning_rate=2e-4), resume="latest", progress=False)


def test_auto_on_another_gpu_tier_keeps_what_the_resumed_run_learns_with():
    from dbnb.train.memory import apply_memory_profile

    t4 = {"name": "Tesla T4", "total_vram_gib": 14.57, "free_vram_gib": 14.0, "capability": [7, 5], "bf16": False}
    a100 = {"name": "NVIDIA A100-SXM4-40GB", "total_vram_gib": 39.39, "free_vram_gib": 39.0, "capability": [8, 0],
            "bf16": True}
    started = apply_memory_profile(Config(memory_profile="auto"), gpu=t4)
    assert started.use_8bit_adam and started.mixed_precision == "fp16"
    moved = apply_memory_profile(Config(memory_profile="auto"), gpu=a100, resumed=started.to_dict())
    assert moved.use_8bit_adam  # the A100's own choice would turn it off
    assert moved.mixed_precision == "bf16" and not moved.gradient_checkpointing  # how it runs: this GPU's


def test_resume_refuses_another_runs_checkpoint(make_config, tmp_path):
    a = train(make_config(max_train_steps=2, save_every_steps=1, run_name="a", keep_last_n=2), progress=False).run_dir
    b_config = make_config(max_train_steps=2, save_every_steps=1, run_name="b", seed=7, keep_last_n=2)
    b = train(b_config, progress=False).run_dir
    before = {p.name: p.stat().st_mtime_ns for p in (b / "checkpoints").rglob("*")}
    other = a / "checkpoints" / "step-000001"
    with pytest.raises(RunFolderError, match=r"belongs to run 'a' .* Resume that run \(run_name=a output_dir="):
        train(b_config.replace(max_train_steps=3), resume=str(other), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (b / "checkpoints").rglob("*")} == before  # nothing overwritten
    # a fresh run_name cannot adopt it either, and leaves no folder behind
    with pytest.raises(RunFolderError, match="belongs to run 'a'"):
        train(b_config.replace(run_name="c"), resume=str(other), progress=False)
    assert not (tmp_path / "runs" / "c").exists()
    # its own checkpoint by path resumes, and the new checkpoints carry the run's id
    result = train(b_config.replace(max_train_steps=3), resume=str(b / "checkpoints" / "step-000001"), progress=False)
    assert result.step == 3
    state = json.loads((b / "checkpoints" / "step-000003" / "state" / "trainer.json").read_text())
    assert state["run_id"] == json.loads((b / "config.json").read_text())["run_id"] and state["run_name"] == "b"
    # a run's config.json starts a new run as it is (the run id is not a setting)
    from dbnb.core.config import load_config
    assert load_config(b / "config.json") == b_config


def test_resume_refuses_another_base_model_but_takes_a_copy_of_the_same(make_config, tiny_dir, tmp_path, capsys):
    from dbnb.faces.cli import main
    from dbnb.world.tiny import make_tiny_model

    config = make_config(max_train_steps=2, save_every_steps=1, run_name="based")
    train(config, progress=False)
    other = make_tiny_model(tmp_path / "other", seed=1)  # same shapes, other weights: only content tells
    make_tiny_model(tmp_path / "same", single_file=tmp_path / "same.safetensors", seed=0)  # tiny_dir's weights
    longer = config.replace(max_train_steps=3, pretrained_model_name_or_path=str(other))
    assert main(["train", str(longer.save(tmp_path / "c.yaml")), "--no-progress", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert (f"started from pretrained_model_name_or_path={str(tiny_dir)!r}, but this config loads "
            f"pretrained_model_name_or_path={str(other)!r}, a different model (its unet, vae, text_encoder "
            "differ by content") in err and "Traceback" not in err, err
    run = Path(config.output_dir) / "based"
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    # The same model elsewhere, in another form (a single file): resumed.
    copy = longer.replace(pretrained_model_name_or_path=str(tmp_path / "same.safetensors"))
    assert main(["train", str(copy.save(tmp_path / "c.yaml")), "--no-progress", "--resume", "latest"]) == 0
    assert sorted(c.name for c in (run / "checkpoints").iterdir())[-1] == "step-000003"


@pytest.mark.own_logic
def test_resume_latest_names_a_damaged_checkpoint_and_the_one_to_resume_from(make_config, tmp_path):
    config = make_config(max_train_steps=3, save_every_steps=1, run_name="cut", keep_last_n=2)
    run = train(config, progress=False).run_dir
    newest = run / "checkpoints" / "step-000003"
    unet = newest / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:1000])  # a Drive copy that did not finish
    longer = config.replace(max_train_steps=4)
    done = subprocess.run(_cli(longer, tmp_path, "--resume", "latest"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"dbnb: resume latest: the newest checkpoint {newest} is damaged")
    assert str(unet) in message and f"--resume {run / 'checkpoints' / 'step-000002'}" in message
    assert unet.stat().st_size == 1000  # nothing was touched, nothing fell back silently
    result = train(longer, resume=str(run / "checkpoints" / "step-000002"), progress=False)
    assert result.step == 4 and result.checkpoints[0].name == "step-000003"
    assert unet.stat().st_size > 1000  # step 3 written again, whole


@pytest.mark.own_logic
def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_resume_works(make_config, monkeypatch):
    from dbnb.core.disk import DiskFullError

    config = make_config(max_train_steps=3, save_every_steps=1, run_name="full")
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if "step-000002" in str(f) and str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"PK\x03\x04 half")  # what torch.save leaves when the disk fills
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3200 vs 3136")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(DiskFullError) as e:
        train(config, progress=False)
    run = Path(config.output_dir) / "full"
    first = run / "checkpoints" / "step-000001"
    message = str(e.value)
    assert message.startswith(f"Disk full at {run} while saving checkpoint step 2: need ~")
    assert f"The previous checkpoint {first} is intact" in message and "--resume latest" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]  # no half-written folder
    monkeypatch.setattr(torch, "save", real_save)
    assert train(config, resume="latest", progress=False).step == 3


def test_previews_that_would_render_more_than_a_few_images_warn_before_the_model_loads(make_config, tmp_path):
    """The guide's Number of Samples warning (5000 made 5000 images at every preview): said with the
    count and the settings that lower it before the first step, while the user can still change them."""
    import warnings

    from dbnb.core.config import FEW_PREVIEWS
    from dbnb.family.source import ModelLoadError

    config = make_config(pretrained_model_name_or_path=str(tmp_path / "no-model"), max_train_steps=4,
                         sample_every_steps=2, num_samples=3, sample_prompts=("a", "b"))
    said = (r"every sample_every_steps=2 steps renders 2 prompt\(s\) × num_samples=3 = 6 images \(12 in the run\).*"
            r"lower num_samples or the number of sample_prompts, or raise sample_every_steps")
    with pytest.warns(UserWarning, match=said), pytest.raises(ModelLoadError):
        train(config, progress=False)
    # a few (the default: 2 of the instance prompt), or no preview in the run: nothing said
    for quiet in (dict(num_samples=2, sample_prompts=()), dict(num_samples=FEW_PREVIEWS, sample_prompts=("a",)),
                  dict(sample_every_steps=0), dict(sample_every_steps=5)):
        with warnings.catch_warnings(record=True) as seen, pytest.raises(ModelLoadError):
            warnings.simplefilter("always")
            train(config.replace(**quiet), progress=False)
        assert not [w for w in seen if "previews:" in str(w.message)], quiet
    with pytest.raises(ConfigError, match="num_samples: 5000 must be at most 16"):
        config.replace(num_samples=5000)


@pytest.mark.parametrize("class_prompt, warned", [("HNZK  girl", True), ("girl", False)])
def test_a_class_prompt_equal_to_the_instance_prompt_warns_once_naming_both(make_config, class_prompt, warned):
    """The class images would be learnt as the character: said once, before the model loads."""
    import warnings

    config = make_config(max_train_steps=1, with_prior_preservation=True, num_class_images=6,
                         class_prompt=class_prompt, run_name=f"same-{warned}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, progress=False)
    said = [str(w.message) for w in caught if "class_prompt is the same as instance_prompt" in str(w.message)]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert "'hnzk girl'" in said[0] and "learnt as the character" in said[0]
        assert config.class_data_dir in said[0]


def test_prompts_past_77_tokens_warn_once_per_run_with_the_count_and_the_longest(make_config):
    import warnings

    config = make_config(max_train_steps=1, with_prior_preservation=False, instance_prompt="hnzk girl, [filewords]")
    pictures = sorted(Path(config.instance_data_dir).glob("*.png"))
    for n, picture in zip((40, 60, 0), pictures):
        picture.with_suffix(".txt").write_text(", ".join(["pink hair"] * n) or "smile")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, progress=False)
    said = [str(w.message) for w in caught if "tokens" in str(w.message) and "75" in str(w.message)]
    assert len(said) == 1, said
    assert said[0].startswith(f"2 of {len(pictures)} training prompts have more than CLIP's 75 tokens")
    assert f"the longest: {pictures[1]} (" in said[0]


@pytest.mark.own_logic
def test_disk_full_says_which_older_checkpoints_and_previews_to_delete_with_their_sizes(make_config, monkeypatch):
    """keep_last_n prunes resume states only, which are gone already when the disk fills: the
    advice is what really takes the room, with sizes, and that the newest must stay."""
    from dbnb.core.disk import DiskFullError, format_bytes
    from dbnb.run.checkpoints import dir_size

    config = make_config(max_train_steps=3, save_every_steps=1, sample_every_steps=1, run_name="fullold",
                         keep_last_n=1)
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if "step-000003" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 3200 vs 3136")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    with pytest.raises(DiskFullError) as e:
        train(config, progress=False)
    run = Path(config.output_dir) / "fullold"
    message = str(e.value)
    first = run / "checkpoints" / "step-000001"
    assert f"older checkpoint folders in {run / 'checkpoints'}" in message
    assert f"step-000001 ({format_bytes(dir_size(first))})" in message and "keep the newest, step-000002" in message
    assert f"the previews in {run / 'samples'} ({format_bytes(dir_size(run / 'samples'))})" in message
    assert "keep_last_n" not in message and message.endswith("CLI: --resume latest).")


@pytest.mark.own_logic
def test_disk_full_inside_safetensors_is_the_same_disk_full(make_config, tmp_path, monkeypatch, capsys):
    """diffusers writes the UNet through safetensors, whose error on a full disk is its own
    SafetensorError (an Exception, not an OSError): the same message, the checkpoints kept."""
    import safetensors.torch
    from safetensors import SafetensorError

    from dbnb.faces.cli import main

    real_save = safetensors.torch.save_file

    def save_on_a_full_disk(tensors, filename, *args, **kwargs):
        if "step-000002" in str(filename):
            Path(filename).write_bytes(b"half a file")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *args, **kwargs)
    monkeypatch.setattr(safetensors.torch, "save_file", save_on_a_full_disk)
    config = make_config(max_train_steps=3, save_every_steps=1, run_name="fullst")
    path = config.save(tmp_path / "fullst.yaml")
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    run = Path(config.output_dir) / "fullst"
    assert err.startswith(f"dbnb: Disk full at {run} while saving checkpoint step 2") and "Traceback" not in err
    assert f"The previous checkpoint {run / 'checkpoints' / 'step-000001'} is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert main(["train", str(path), "--no-progress", "--resume", "latest"]) == 0


@pytest.mark.own_logic
def test_disk_full_while_logging_stops_with_the_same_message(make_config, monkeypatch):
    import errno

    from dbnb.core.disk import DiskFullError
    from dbnb.run.checkpoints import RunFolder

    real_append = RunFolder.append_log

    def append_on_a_full_disk(self, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.log_path))
        real_append(self, record)
    monkeypatch.setattr(RunFolder, "append_log", append_on_a_full_disk)
    config = make_config(max_train_steps=4, save_every_steps=2, run_name="fulllog")
    with pytest.raises(DiskFullError, match=r"Disk full at .* while writing step 3's log.*step-000002 is intact"):
        train(config, progress=False)
    monkeypatch.setattr(RunFolder, "append_log", real_append)
    assert train(config, resume="latest", progress=False).step == 4


def test_the_free_space_estimate_is_not_below_the_real_checkpoint_size(make_config, monkeypatch):
    from dbnb.run import checkpoints

    asked = []
    real_check = checkpoints.expected_size
    monkeypatch.setattr(checkpoints, "expected_size", lambda *a: asked.append(real_check(*a)) or asked[-1])
    result = train(make_config(max_train_steps=2, save_every_steps=1, use_ema=True, train_text_encoder=True,
                               keep_last_n=2), progress=False)  # both states kept: each checkpoint whole
    sizes = [checkpoints.dir_size(p) for p in result.checkpoints]
    for estimate, real in zip(asked, sizes):
        print(f"checkpoint {real:,} B, estimated {estimate:,} B")
        assert real <= estimate <= real * 1.1 + (1 << 20), (estimate, real)


def _cli(config, tmp_path, *extra):
    path = config.save(tmp_path / f"{config.run_name}.json")
    return [sys.executable, "-m", "dbnb", "train", str(path), "--no-progress", *extra]


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.own_logic
def test_kill_9_then_resume_matches_the_uninterrupted_run(make_config, tmp_path):
    steps = 24
    killed = make_config(max_train_steps=steps, save_every_steps=3, run_name="killed", use_ema=True,
                         with_prior_preservation=True, num_class_images=6, hflip=True, train_batch_size=2,
                         lr_scheduler="polynomial", lr_warmup_steps=4, learning_rate=2e-4)
    proc = subprocess.Popen(_cli(killed, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "runs" / "killed" / "checkpoints" / "step-000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = train(killed, resume="latest", progress=False)
    assert resumed.step == steps and resumed.checkpoints[0].name > "step-000006"
    assert not list((resumed.run_dir / "checkpoints").glob(".tmp-*"))

    straight = train(killed.replace(run_name="straight"), progress=False)
    for ema in (False, True):
        a, b = unet_weights(resumed.run_dir, steps, ema), unet_weights(straight.run_dir, steps, ema)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"ema={ema} {k}")
    log = [json.loads(x)["step"] for x in (resumed.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert log == list(range(1, steps + 1))


@pytest.mark.own_logic
def test_sigterm_cancels_at_a_step_boundary_and_saves(make_config, tmp_path):
    config = make_config(max_train_steps=500, save_every_steps=0, run_name="cancel")
    proc = subprocess.Popen(_cli(config, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "runs" / "cancel" / "logs" / "train.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "cancelled at step" in out
    saved = sorted((tmp_path / "runs" / "cancel" / "checkpoints").iterdir())
    assert len(saved) == 1 and (saved[0] / "state" / "trainer.json").is_file()
    assert 0 < json.loads((saved[0] / "state" / "trainer.json").read_text())["step"] < 500


@pytest.mark.own_logic
@pytest.mark.slow  # two real CLI trainings
def test_a_second_training_in_the_same_run_folder_is_refused_and_changes_nothing(make_config, tmp_path):
    first = make_config(max_train_steps=500, save_every_steps=0, run_name="dup")
    proc = subprocess.Popen(_cli(first, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "dup"
    _wait_for(run / "logs" / "train.jsonl", proc)
    # the second one as a real user would start it, and again with --resume (which used to
    # delete the first one's half-written save)
    for extra in ((), ("--resume", "latest")):
        second = subprocess.run(_cli(first.replace(learning_rate=3e-4), tmp_path, *extra),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.startswith("dbnb: ") and "Traceback" not in second.stderr
        assert f"in use by another training (pid {proc.pid}" in second.stderr
        assert "train.lock" in second.stderr and "run_name" in second.stderr
    assert {k: v for k, v in json.loads((run / "config.json").read_text()).items()
            if k not in ("run_id", "dbnb_version")} == first.to_dict()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == list(range(1, steps[-1] + 1))  # one run's log, never truncated or interleaved
    assert not (run / "train.lock").exists()  # released on the way out
    resumed = train(first.replace(max_train_steps=steps[-1] + 2), resume="latest", progress=False)
    assert resumed.step == steps[-1] + 2


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, monkeypatch, capsys):
    from dbnb.run import lock as runlock
    from dbnb.run.checkpoints import RunFolder, RunInUseError

    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.lock_path.write_text(json.dumps({"pid": int(dead.stdout), "host": runlock.socket.gethostname(),
                                         "started": "x"}))
    with run.hold():  # a dead process on this host: taken over at once
        assert json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    assert "process" in capsys.readouterr().out and not run.lock_path.exists()

    # another machine (a Colab VM, seen through Drive): alive while its heartbeat is fresh
    run.lock_path.write_text(json.dumps({"pid": 1, "host": "other-vm", "started": "x"}))
    with pytest.raises(RunInUseError, match="pid 1 on other-vm"):
        with run.hold():
            pass
    old = time.time() - runlock.STALE_AFTER_S - 60
    os.utime(run.lock_path, (old, old))
    with run.hold():
        assert json.loads(run.lock_path.read_text())["host"] != "other-vm"
    assert "no heartbeat for 11 minutes" in capsys.readouterr().out

    # the holder's heartbeat keeps its lock fresh
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    with run.hold():
        os.utime(run.lock_path, (old, old))
        time.sleep(0.5)
        assert time.time() - run.lock_path.stat().st_mtime < 5


@pytest.mark.own_logic
def test_a_second_ctrl_c_stops_at_once_with_one_line(make_config, tmp_path):
    config = make_config(max_train_steps=500, save_every_steps=0, run_name="twice")
    proc = subprocess.Popen(_cli(config, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "runs" / "twice" / "logs" / "train.jsonl", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("dbnb: Stopped at step ")
    assert "without saving (Ctrl-C twice); last checkpoint: none." in err
    assert not list((tmp_path / "runs" / "twice" / "checkpoints").iterdir())  # no half-written save either


@pytest.mark.own_logic
def test_two_process_cpu_ddp_completes(make_config, tmp_path):
    config = make_config(max_train_steps=4, save_every_steps=2, run_name="ddp")
    path = config.save(tmp_path / "ddp.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dbnb", "train",
           str(path), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 process(es)" in done.stdout
    run = tmp_path / "runs" / "ddp"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    steps = [json.loads(x)["step"] for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # only the main process writes


def _ddp(config, tmp_path, env=None):
    path = config.save(tmp_path / f"{config.run_name}.json")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dbnb",
                             "train", str(path), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


@pytest.mark.own_logic
def test_two_process_ddp_stops_together_when_only_one_rank_is_signalled(make_config, tmp_path):
    """A SIGTERM that reaches one process (the other rank's) stops both at one step, saved."""
    import psutil

    config = make_config(max_train_steps=400, save_every_steps=0, run_name="ddp-stop")
    proc = _ddp(config, tmp_path)
    log = tmp_path / "runs" / "ddp-stop" / "logs" / "train.jsonl"
    _wait_for(log, proc, timeout=300)
    ranks = {c.environ().get("RANK"): c for c in psutil.Process(proc.pid).children(recursive=True)
             if "RANK" in c.environ()}
    ranks["1"].send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=240)  # without one agreed decision: rank 0 waits in an all-reduce forever
    finally:
        for p in [*ranks.values(), psutil.Process(proc.pid)] if proc.poll() is None else []:
            p.kill()
    # dbnb's "cancelled" exit (130); torchrun may end the slower rank itself once the first has exited
    assert proc.returncode != 0 and "exitcode  : 130" in err, err[-3000:]
    assert "SIGTERM: stopping after this step and saving" in out + err and "cancelled at step" in out
    saved = sorted(p.name for p in (tmp_path / "runs" / "ddp-stop" / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0][5:]) < 400


@pytest.mark.own_logic
def test_two_process_ddp_raises_on_both_ranks_when_one_loss_is_nan(make_config, tmp_path):
    """An fp16 overflow on one rank's batch: both ranks stop with dbnb's divergence message."""
    hook = tmp_path / "hook"
    hook.mkdir()
    # Stands in for an overflow on rank 1's third micro-step; everything else is the real trainer.
    (hook / "sitecustomize.py").write_text(
        "import os\nif os.environ.get('RANK') == '1':\n"
        "    import dbnb.train.loop as t\n    real, calls = t.diffusion_loss, []\n"
        "    def nan_on_third(*a, **k):\n        calls.append(1)\n        loss = real(*a, **k)\n"
        "        return loss * float('nan') if len(calls) == 3 else loss\n"
        "    t.diffusion_loss = nan_on_third\n")
    config = make_config(max_train_steps=6, save_every_steps=1, run_name="ddp-nan")
    # the hook first, then what the test runs on (a worktree's dbnb named by PYTHONPATH, not the installed one)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    proc = _ddp(config, tmp_path, {"PYTHONPATH": path})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and err.count("Loss became") == 2, err[-3000:]  # said by each rank, none hangs
    assert "Loss became inf or NaN on another process at step 3" in err and "Loss became nan at step 3" in err
    saved = sorted(p.name for p in (tmp_path / "runs" / "ddp-nan" / "checkpoints").iterdir())
    assert saved == ["step-000001", "step-000002"]


def test_optimizer_in_backward_trains_like_the_normal_path(make_config):
    normal = train(make_config(max_train_steps=3, max_grad_norm=0.0, run_name="normal"), progress=False)
    hooked = train(make_config(max_train_steps=3, max_grad_norm=0.0, run_name="hooked", optimizer_in_backward=True),
                   progress=False)
    a, b = unet_weights(normal.run_dir, 3), unet_weights(hooked.run_dir, 3)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    log = json.loads((hooked.run_dir / "logs" / "train.jsonl").read_text().splitlines()[-1])
    assert log["grad_norm"] > 0  # measured in the hooks
    with pytest.raises(ConfigError, match="max_grad_norm"):
        train(make_config(optimizer_in_backward=True, run_name="clip"), progress=False)


def test_shuffled_captions_resume_exactly(make_config, tmp_path):
    instance = tmp_path / "data" / "instance"
    tags = ["1girl", "pink hair", "smile", "school uniform", "classroom", "blue eyes"]
    for i, image in enumerate(sorted(instance.glob("*.png"))):
        image.with_suffix(".txt").write_text(", ".join(["hnzk girl"] + tags[i:] + tags[:i]))
    config = make_config(instance_prompt="[filewords]", max_train_steps=4, save_every_steps=2, train_batch_size=2,
                         shuffle_caption=True, keep_tokens=1, caption_tag_dropout_rate=0.3,
                         caption_dropout_rate=0.2, learning_rate=5e-4)
    straight = train(config.replace(run_name="straight"), progress=False)
    train(config.replace(run_name="resumed", max_train_steps=2), progress=False)
    resumed = train(config.replace(run_name="resumed"), resume="latest", progress=False)
    plain = train(config.replace(run_name="plain", shuffle_caption=False, caption_tag_dropout_rate=0.0,
                                 caption_dropout_rate=0.0), progress=False)
    a, b, c = (unet_weights(r.run_dir, 4) for r in (straight, resumed, plain))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert any(not torch.allclose(a[k], c[k], atol=1e-6) for k in a)  # the captions did vary


def test_alpha_mask_loss_equals_the_plain_loss_when_opaque_and_ignores_transparent_pixels(make_config):
    from dbnb.family.sd1.load import load_pipeline

    config = make_config()
    pipe = load_pipeline(config.pretrained_model_name_or_path)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = read_images(config, pipe.tokenizer).instance.input_ids[:2]

    class Spy(torch.nn.Module):  # the real UNet; keeps the gradient that reaches its prediction
        def __init__(self, unet):
            super().__init__()
            self.unet, self.grad = unet, None

        def forward(self, *args):
            out = self.unet(*args)
            out.sample.register_hook(lambda g: setattr(self, "grad", g))
            return out

    def loss(mask, unet=pipe.unet):
        return diffusion_loss(unet, pipe.text_encoder, _ddpm(pipe),
                              MicroBatch(latents, {"input_ids": ids}, torch.Generator().manual_seed(1), mask), config,
                              family=SD1)
    assert loss(torch.ones(2, 1, 8, 8)).item() == loss(None).item()
    half = torch.ones(2, 1, 8, 8)
    half[..., :4] = 0.0  # the left half transparent
    spy = Spy(pipe.unet)
    loss(half, spy).backward()
    assert torch.count_nonzero(spy.grad[..., :4]) == 0 and torch.count_nonzero(spy.grad[..., 4:]) > 0
    assert 0 < loss(half).item() < loss(None).item()


def test_alpha_mask_loss_trains_like_plain_on_opaque_pictures_and_refuses_transparent_class_images(make_config):
    plain = train(make_config(max_train_steps=2, hflip=True, run_name="plain"), progress=False)
    masked = train(make_config(max_train_steps=2, hflip=True, run_name="masked", alpha_mask_loss=True),
                   progress=False)
    a, b = unet_weights(plain.run_dir, 2), unet_weights(masked.run_dir, 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    with pytest.raises(data.DatasetError, match="alpha_mask_loss is on.*fully transparent.*no loss at all"):
        train(make_config(with_prior_preservation=True, num_class_images=6, alpha_mask_loss=True,
                          run_name="refused"), progress=False)


def test_min_snr_weights_follow_the_definition():
    from diffusers import DDPMScheduler

    from dbnb.train.loss import min_snr_weights

    t = torch.tensor([0, 10, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(prediction_type=prediction)
        alphas = scheduler.alphas_cumprod[t]
        snr = alphas / (1 - alphas)
        want = torch.clamp(snr, max=5.0) / (snr + 1 if prediction == "v_prediction" else snr)
        torch.testing.assert_close(min_snr_weights(scheduler, t, 5.0), want.float(), rtol=1e-4, atol=0)


def test_0_transparent_class_images_means_10x_the_pictures_in_the_run(make_config, capsys):
    from dbnb.train.loop import resolve_class_count

    config = make_config(with_prior_preservation=True, class_images_mode="transparent", num_class_images=0)
    assert resolve_class_count(config).num_class_images == 30  # 3 pictures, the seed's 10x
    assert "num_class_images=0 with class_images_mode=transparent: 30" in capsys.readouterr().out
    assert resolve_class_count(config.replace(num_class_images=6)).num_class_images == 6
