"""LoRA / LoCon DreamBooth on the tiny model, on CPU: real training runs, nothing mocked."""
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dbnb.core.config import FIELDS, Config, ConfigError
from dbnb.data.batches import MicroBatch, read_images
from dbnb.data.dataset import unit_range
from dbnb.family import lora
from dbnb.family.sd1.family import SD1
from dbnb.family.sd1.load import load_pipeline
from dbnb.run.checkpoints import dir_size
from dbnb.run.folder import RunFolder
from dbnb.train.loop import diffusion_loss, train
from dbnb.world.demo import write_dataset
from dbnb.world.tiny import build_tiny_pipeline

LORA = dict(use_lora=True, lora_rank=4, lora_conv_rank=2, lora_text_encoder_rank=2)


@pytest.fixture
def make_config(make_config):
    """conftest's tiny run, as LoRA, with the settings' own learning_rate and train_text_encoder."""
    defaults = {name: FIELDS[name].default for name in ("learning_rate", "train_text_encoder")}
    return lambda **overrides: make_config(**{**defaults, **LORA, **overrides})


def fixed_loss(config, checkpoint=None):
    """Mean training-set loss at fixed noise and timesteps, of the base model or a checkpoint on it."""
    from diffusers import DDPMScheduler

    pipe = load_pipeline(config.pretrained_model_name_or_path)
    if checkpoint is not None:
        checkpoint.load_into(pipe.unet, pipe.text_encoder)
    plain = config.replace(with_prior_preservation=False)
    batches = read_images(plain, pipe.tokenizer)
    with torch.no_grad():
        latents = pipe.vae.encode(unit_range(batches.instance.images)).latent_dist.mean
        losses = [diffusion_loss(pipe.unet, pipe.text_encoder, DDPMScheduler.from_config(pipe.scheduler.config),
                                 MicroBatch(latents, {"input_ids": batches.instance.input_ids},
                                            torch.Generator().manual_seed(k)),
                                 plain, family=SD1, scaling_factor=pipe.vae.config.scaling_factor).item()
                  for k in range(8)]
    return sum(losses) / len(losses)


def test_lora_with_conv_and_text_encoder_trains_and_the_loss_drops(make_config):
    config = make_config(max_train_steps=40, lora_learning_rate=3e-3, lora_text_encoder_learning_rate=1e-3,
                         train_batch_size=2, gradient_checkpointing=True)
    before = fixed_loss(config)
    result = train(config, progress=False)
    checkpoint = RunFolder(result.run_dir).pick(40)
    after = fixed_loss(config, checkpoint)
    print(f"fixed-noise training loss: before {before:.4f}, after {after:.4f}")
    assert after <= 0.7 * before, (before, after)
    # the text encoder's adapters learnt too (they start at zero: lora_B is zero-initialised)
    _, text = lora.read(checkpoint.path / "lora", SD1.parts)
    assert text and max(v.abs().max().item() for k, v in text.items() if "lora_B" in k) > 0


def test_a_lora_checkpoint_holds_only_the_adapters_and_its_size_is_estimated(make_config, monkeypatch):
    from dbnb.run import checkpoints

    asked = []
    real = checkpoints.expected_size
    monkeypatch.setattr(checkpoints, "expected_size", lambda *a: asked.append(real(*a)) or asked[-1])
    result = train(make_config(max_train_steps=2, save_every_steps=1, use_ema=True, keep_last_n=2), progress=False)
    run = RunFolder(result.run_dir)
    checkpoint = run.pick(2)
    assert checkpoint.kind == "lora" and checkpoint.parts == {"unet", "text_encoder", "ema", "state"}
    assert sorted(p.name for p in checkpoint.path.iterdir()) == ["lora", "state"]  # no UNet, no text encoder
    unet_file = Path(make_config().pretrained_model_name_or_path) / "unet" / "diffusion_pytorch_model.safetensors"
    weights = dir_size(checkpoint.path / "lora")
    print(f"LoRA weights {weights:,} B (+ EMA), UNet {unet_file.stat().st_size:,} B")
    assert weights < 0.5 * unet_file.stat().st_size
    for estimate, path in zip(asked, result.checkpoints):
        assert dir_size(path) <= estimate <= dir_size(path) * 1.1 + (1 << 20)
    with pytest.raises(checkpoints.CheckpointError, match="LoRA checkpoint"):
        checkpoint.denoiser_state()


def test_every_text_encoder_layer_and_every_transformer_block_gets_its_adapters():
    pipe = build_tiny_pipeline()
    spec = lora.Spec(rank=4, alpha=4.0, conv_rank=2, text_encoder_rank=2)
    lora.add_adapters(pipe.unet, pipe.text_encoder, spec, SD1, seed=0)
    # kohya once trained a third of the encoder's modules: every layer must have all six
    per_layer = {}
    for key in lora.adapter_state(pipe.text_encoder):
        # transformers 4 keeps the `text_model.` prefix, 5 drops it
        m = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.(.+)\.lora_A\.weight$", key)
        if m:
            per_layer.setdefault(int(m.group(1)), set()).add(m.group(2))
    layers = pipe.text_encoder.config.num_hidden_layers
    assert sorted(per_layer) == list(range(layers))
    assert all(v == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "mlp.fc1", "mlp.fc2"} for v in per_layer.values()), per_layer
    unet_keys = {k.rsplit(".lora_", 1)[0] for k in lora.adapter_state(pipe.unet)}
    blocks = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
            assert f"{block}.{leaf}" in unet_keys
    resnets = [n for n, m in pipe.unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert blocks and resnets and all(f"{r}.conv1" in unet_keys and f"{r}.conv2" in unet_keys for r in resnets)
    samplers = [n for n, m in pipe.unet.named_modules() if type(m).__name__ in ("Downsample2D", "Upsample2D")]
    assert samplers and all(f"{s}.conv" in unet_keys for s in samplers)
    # LoCon's convs at their own rank; nothing outside the kohya set (conv_in, time embedding)
    state = lora.adapter_state(pipe.unet)
    assert state[f"{resnets[0]}.conv1.lora_A.weight"].shape[0] == 2
    assert state[f"{blocks[0]}.attn1.to_q.lora_A.weight"].shape[0] == 4
    assert not any(k.startswith(("conv_in", "conv_out", "time_embedding")) for k in unet_keys)
    # only the adapters learn
    assert all("lora_" in n for n, p in pipe.unet.named_parameters() if p.requires_grad)


def test_lora_settings_that_cannot_work_name_the_fix():
    # train_text_encoder (on by default, the guide's setup) is the full run's switch: a LoRA run's text
    # encoder learns through its adapters only, whatever it says (its help says so).
    assert Config().train_text_encoder and not Config(use_lora=True).fine_tunes_text_encoder
    with pytest.raises(ConfigError, match="lora_rank: 0 must be at least 1"):
        Config(use_lora=True, lora_rank=0)
    with pytest.raises(ConfigError, match="lora_conv_rank: -1"):
        Config(lora_conv_rank=-1)
    with pytest.raises(ConfigError, match="lora_dropout"):
        Config(lora_dropout=1.0)
    assert Config(use_lora=True, lora_text_encoder_rank=8).trains_text_encoder
    assert not Config(use_lora=True).trains_text_encoder


def _cli(config, tmp_path):
    path = config.save(tmp_path / f"{config.run_name}.json")
    return [sys.executable, "-m", "dbnb", "train", str(path), "--no-progress"]


@pytest.mark.own_logic
def test_kill_9_then_resume_of_a_lora_run_matches_the_uninterrupted_run(make_config, tmp_path):
    from test_train import _wait_for

    steps = 12
    killed = make_config(max_train_steps=steps, save_every_steps=3, run_name="killed", use_ema=True,
                         with_prior_preservation=True, num_class_images=6, hflip=True, train_batch_size=2,
                         lr_scheduler="polynomial", lr_warmup_steps=4, lora_dropout=0.1)
    proc = subprocess.Popen(_cli(killed, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "runs" / "killed" / "checkpoints" / "step-000006", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = train(killed, resume="latest", progress=False)
    assert resumed.step == steps and resumed.checkpoints[0].name > "step-000006"
    straight = train(killed.replace(run_name="straight"), progress=False)
    for ema in (False, True):
        a = lora.read(RunFolder(resumed.run_dir).pick(steps).path / "lora", SD1.parts, ema)
        b = lora.read(RunFolder(straight.run_dir).pick(steps).path / "lora", SD1.parts, ema)
        for part_a, part_b in zip(a, b):
            assert part_a.keys() == part_b.keys() and part_a
            for k in part_a:
                torch.testing.assert_close(part_a[k], part_b[k], rtol=0, atol=1e-6, msg=f"ema={ema} {k}")


def test_the_ema_of_the_adapters_differs_from_them(make_config):
    result = train(make_config(use_ema=True, ema_decay=0.5, max_train_steps=3, lora_learning_rate=1e-2),
                   progress=False)
    folder = RunFolder(result.run_dir).pick(3).path / "lora"
    (raw_unet, raw_text), (ema_unet, ema_text) = lora.read(folder, SD1.parts), lora.read(folder, SD1.parts, ema=True)
    assert raw_unet.keys() == ema_unet.keys() and raw_text.keys() == ema_text.keys()
    assert any(not torch.equal(raw_unet[k], ema_unet[k]) for k in raw_unet)


# --- export: the kohya / webui file ----------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-export")
    instance, _ = write_dataset(root / "data", n_instance=2)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt="hnzk girl", output_dir=str(root / "runs"), run_name="hnzk", resolution=64,
                    max_train_steps=3, save_every_steps=0, lora_learning_rate=1e-2,
                    lora_text_encoder_learning_rate=1e-2, mixed_precision="no", use_8bit_adam=False,
                    gradient_checkpointing=False, use_ema=True, ema_decay=0.5, **{**LORA, "lora_alpha": 2.0})
    return train(config, progress=False).run_dir


def _checkpoint_outputs(run_dir, ema=False):
    from dbnb.ship import kohya

    models = SD1.open(_base(run_dir))
    RunFolder(run_dir).pick(None).load_into(models.denoiser, models.encoder, ema=ema)
    return kohya.outputs(models, SD1)


def _base(run_dir):
    import json
    return json.loads((Path(run_dir) / "config.json").read_text())["pretrained_model_name_or_path"]


def test_the_lora_export_has_kohyas_keys_and_metadata(lora_run):
    from safetensors import safe_open

    from dbnb.ship.export import export

    result = export(lora_run, precision="fp16", overwrite=True)
    assert result.verified and result.path == lora_run / "exports" / "hnzk_3.safetensors"
    with safe_open(str(result.path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor(next(k for k in keys if k.endswith("attn1_to_q.alpha")))
        conv_alpha = f.get_tensor(next(k for k in keys if k.endswith("resnets_0_conv1.alpha")))
    modules = {k.split(".")[0] for k in keys}
    assert all({f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= keys for m in modules)
    assert len(keys) == 3 * len(modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in modules  # LoCon
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in modules
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for m in modules)
    assert alpha.item() == pytest.approx(2.0) and conv_alpha.item() == pytest.approx(1.0)  # alpha/rank kept
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == "2" and meta["ss_output_name"] == "hnzk_3"
    assert "conv_dim" in meta["ss_network_args"] and meta["dbnb_version"]
    base = Path(_base(lora_run))  # trained from a local folder: kohya's field names it, not its path
    assert base.is_absolute() and meta["ss_sd_model_name"] == base.name
    assert result.size < 1 << 20


def test_diffusers_reads_the_lora_file_back_equal_to_the_checkpoint(lora_run):
    from dbnb.ship import kohya
    from dbnb.ship.export import export

    for ema in (False, True):
        path = export(lora_run, precision="fp32", ema=ema, overwrite=True).path
        expected = _checkpoint_outputs(lora_run, ema)
        models = SD1.open(_base(lora_run))
        base = kohya.outputs(models, SD1, conditioning=expected[0])
        kohya.load_file_into(models, path, SD1.parts)
        got = kohya.outputs(models, SD1, conditioning=expected[0])
        for e_g, e_b in zip(kohya.differences(expected, got), kohya.differences(expected, base)):
            assert e_g <= 1e-4
            assert e_b > 1e-3  # the LoRA changes both models: the check can fail


def test_a_key_diffusers_would_ignore_is_an_error(lora_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from dbnb.ship import kohya
    from dbnb.ship.export import export

    path = export(lora_run, precision="fp32", overwrite=True).path
    state = load_file(str(path))
    state.pop(next(k for k in state if k.startswith("lora_te_") and k.endswith("lora_up.weight")))
    save_file({**state, "lora_unet_conv_in.lora_down.weight": torch.zeros(1)}, str(tmp_path / "odd.safetensors"))
    save_file({**load_file(str(path)), "model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    for bad in ("odd", "x"):
        with pytest.raises(kohya.KohyaError):
            kohya.verify(tmp_path / f"{bad}.safetensors", _checkpoint_outputs(lora_run),
                         lambda: SD1.open(_base(lora_run)), SD1)


def test_bake_writes_a_full_model_equal_to_base_plus_lora(lora_run):
    from dbnb.ship import kohya
    from dbnb.ship.export import export

    result = export(lora_run, bake=True, precision="fp32", overwrite=True)
    assert result.verified and result.size > 4 << 20
    baked = SD1.open(str(result.path))
    expected = _checkpoint_outputs(lora_run)
    for difference in kohya.differences(expected, kohya.outputs(baked, SD1, conditioning=expected[0])):
        assert difference <= 1e-4


def test_sampling_a_lora_checkpoint_differs_from_the_base_and_follows_lora_scale(lora_run):
    import numpy as np
    from PIL import Image

    from dbnb.evaluate.sample import sample_run

    fast = ["test_seeds=1", "test_infer_steps=2", "test_flexibility_prompts=[]", "test_wide=0"]
    first = sample_run(lora_run, fast, progress=False)
    base_row, trained = first.rows
    prompt = first.prompts[0]
    pixels = lambda r: np.asarray(Image.open(first.image_path(r, prompt, 0)).convert("RGB"), dtype=float)  # noqa: E731
    full = pixels(trained)
    assert np.abs(full - pixels(base_row)).max() > 0
    zero = sample_run(lora_run, fast + ["lora_scale=0"], progress=False)
    assert zero.rendered == 1  # only the LoRA row is made again
    assert np.array_equal(pixels(trained), pixels(base_row))  # scale 0: the base model's image


def test_the_report_of_a_lora_run_names_its_ranks_and_file_size(lora_run):
    from dbnb.ship.export import export
    from dbnb.ship.report import report_markdown

    path = export(lora_run, overwrite=True).path
    text = report_markdown(lora_run)
    assert "LoRA: rank 4, alpha 2, conv rank (LoCon) 2, text-encoder rank 2" in text
    # The report names the newest export (by time): the one just written, whatever others this
    # module's tests (an EMA one) wrote before.
    assert f"file {path.name} {path.stat().st_size / 2**20:.1f} MiB" in text
