"""The trainer on the tiny model, on CPU: real training runs, nothing mocked."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dbnb import data
from dbnb.checkpoints import RunFolderError
from dbnb.config import Config, ConfigError
from dbnb.demo import write_dataset
from dbnb.train import TrainingError, diffusion_loss, read_images, train


@pytest.fixture
def make_config(tiny_dir, tmp_path):
    instance, klass = write_dataset(tmp_path / "data", n_instance=3, class_per_instance=2)

    def make(**overrides):
        base = dict(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    class_data_dir=str(klass), instance_prompt="hnzk girl", class_prompt="girl",
                    output_dir=str(tmp_path / "runs"), run_name="run", resolution=64, max_train_steps=4,
                    save_every_steps=0, learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=0,
                    mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False)
        return Config(**{**base, **overrides})
    return make


def unet_weights(run_dir, step, name="unet"):
    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / name / "diffusion_pytorch_model.safetensors")


def fixed_loss(config, unet_state=None):
    """Mean training-set loss at fixed noise and timesteps (the same for every call)."""
    from dbnb.models import load_pipeline

    pipe = load_pipeline(config.pretrained_model_name_or_path)
    if unet_state is not None:
        pipe.unet.load_state_dict(unet_state)
    batches = read_images(config.replace(with_prior_preservation=False), pipe.tokenizer)
    with torch.no_grad():
        latents = pipe.vae.encode(batches.instance.images).latent_dist.mean
        losses = [diffusion_loss(pipe.unet, pipe.text_encoder, _ddpm(pipe), latents, batches.instance.input_ids,
                                 torch.Generator().manual_seed(k), config.replace(with_prior_preservation=False),
                                 pipe.vae.config.scaling_factor, "cpu", False).item() for k in range(8)]
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
    assert json.loads((result.run_dir / "config.json").read_text()) == config.to_dict()


def test_prior_preservation_adds_the_weighted_class_term(make_config):
    from dbnb.models import load_pipeline

    pipe = load_pipeline(make_config().pretrained_model_name_or_path)
    config = make_config(with_prior_preservation=True, num_class_images=6)
    batches = read_images(config, pipe.tokenizer)
    assert len(batches.klass) == 6 and batches.epoch_len == 6
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([batches.instance.input_ids[:1], batches.klass.input_ids[:1]])

    def loss(**kw):
        c = config.replace(**kw)
        return diffusion_loss(pipe.unet, pipe.text_encoder, _ddpm(pipe), latents, ids,
                              torch.Generator().manual_seed(1), c, 1.0, "cpu", False).item()
    instance_only = loss(prior_loss_weight=0.0)
    one, two = loss(prior_loss_weight=1.0), loss(prior_loss_weight=2.0)
    class_term = one - instance_only
    assert class_term > 0
    assert two - one == pytest.approx(class_term, rel=1e-5)


def test_ema_is_saved_and_differs_from_the_raw_weights(make_config):
    result = train(make_config(use_ema=True, ema_decay=0.5, max_train_steps=3), progress=False)
    raw, ema = unet_weights(result.run_dir, 3), unet_weights(result.run_dir, 3, "unet_ema")
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


def test_keep_last_n_drops_old_resume_states_but_keeps_weights(make_config):
    result = train(make_config(max_train_steps=5, save_every_steps=1, keep_last_n=2), progress=False)
    folders = sorted((result.run_dir / "checkpoints").iterdir())
    assert [f.name for f in folders] == [f"step-{s:06d}" for s in range(1, 6)]
    assert all((f / "unet" / "diffusion_pytorch_model.safetensors").is_file() for f in folders)
    assert [f.name for f in folders if (f / "state").exists()] == ["step-000004", "step-000005"]


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(make_config):
    config = make_config(max_train_steps=6, save_every_steps=1, learning_rate=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingError, match=r"diverged.*learning_rate.*fp16") as e:
        train(config, progress=False)
    run = config.output_dir + "/run/checkpoints"
    saved = sorted(os.listdir(run))
    failed_at = int(str(e.value).split(" at step ")[1].split(":")[0])
    assert saved == [f"step-{s:06d}" for s in range(1, failed_at)]  # nothing after the last good step
    assert f"last checkpoint: {run}/{saved[-1]}" in str(e.value)


def test_gradient_clipping_really_clips(make_config):
    base = load_file(make_config().pretrained_model_name_or_path + "/unet/diffusion_pytorch_model.safetensors")

    def change(max_grad_norm, name):
        result = train(make_config(max_train_steps=1, max_grad_norm=max_grad_norm, run_name=name), progress=False)
        after = unet_weights(result.run_dir, 1)
        log = json.loads((result.run_dir / "logs" / "train.jsonl").read_text().splitlines()[0])
        return sum((after[k] - base[k]).abs().sum().item() for k in base), log["grad_norm"]
    free, norm_free = change(0.0, "free")
    clipped, norm = change(1e-9, "clipped")
    assert norm_free is None and norm > 1e-9  # the pre-clip norm is logged when clipping
    assert clipped < 0.1 * free


def test_settings_that_cannot_work_say_what_to_change(make_config):
    with pytest.raises(ConfigError, match="mixed_precision=no"):
        train(make_config(mixed_precision="fp16"), progress=False)
    with pytest.raises(data.DatasetError, match="num_class_images is 50 but .* holds 6"):
        train(make_config(with_prior_preservation=True, num_class_images=50), progress=False)
    with pytest.raises(data.DatasetError, match="does not exist"):
        train(make_config(instance_data_dir="/nonexistent/images"), progress=False)


def test_an_existing_run_needs_resume(make_config):
    config = make_config(max_train_steps=2, save_every_steps=1, keep_last_n=1)
    train(config, progress=False)
    with pytest.raises(RunFolderError, match="--resume latest"):
        train(config, progress=False)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(config.replace(learning_rate=2e-4, max_train_steps=3), resume="latest", progress=False)
    result = train(config.replace(max_train_steps=3), resume="latest", progress=False)
    assert result.step == 3


def _cli(config, tmp_path, *extra):
    path = config.save(tmp_path / f"{config.run_name}.json")
    return [sys.executable, "-m", "dbnb", "train", str(path), "--no-progress", *extra]


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


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
    for name in ("unet", "unet_ema"):
        a, b = unet_weights(resumed.run_dir, steps, name), unet_weights(straight.run_dir, steps, name)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}.{k}")
    log = [json.loads(x)["step"] for x in (resumed.run_dir / "logs" / "train.jsonl").read_text().splitlines()]
    assert log == list(range(1, steps + 1))


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
    from dbnb.models import load_pipeline

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
        return diffusion_loss(unet, pipe.text_encoder, _ddpm(pipe), latents, ids, torch.Generator().manual_seed(1),
                              config, 1.0, "cpu", False, mask)
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
