"""optimizer = adamw | adamw8bit | prodigy | lion on the tiny model, on CPU: each builds and
steps the real weights; the fallbacks warn in one line; the settings that disagree are refused;
a resume that would build another optimizer stops."""
import importlib.util
import json
import warnings

import pytest
import torch

from dbnb.core.config import Config, ConfigError, load_config
from dbnb.core.hardware import Check
from dbnb.family.sd1.load import load_pipeline
from dbnb.run.checkpoints import CheckpointError, name_of
from dbnb.run.folder import RunFolder
from dbnb.train import optimizers
from dbnb.train.loop import train
from dbnb.world.demo import write_dataset

HAS_PRODIGY = importlib.util.find_spec("prodigyopt") is not None
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
NEEDS_BNB = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install bitsandbytes)")
BNB_RUNS = Check("bitsandbytes", True, "runs")  # bitsandbytes 0.50 steps on CPU too; env's check wants CUDA


@pytest.fixture
def make_config(tiny_dir, tmp_path):
    instance, _ = write_dataset(tmp_path / "data", n_instance=2)

    def make(**overrides):
        base = dict(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt="hnzk girl", output_dir=str(tmp_path / "runs"), run_name="run", resolution=64,
                    max_train_steps=2, save_every_steps=1, lr_scheduler="constant", lr_warmup_steps=0,
                    mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False,
                    use_lora=True, lora_rank=4, lora_text_encoder_rank=2, lora_learning_rate=1e-3)
        return Config(**{**base, **overrides})
    return make


@pytest.fixture(scope="module")
def tiny_lora(tiny_dir):
    from dbnb.family import lora
    from dbnb.family.sd1.family import SD1

    pipe = load_pipeline(str(tiny_dir))
    lora.add_adapters(pipe.unet, pipe.text_encoder, lora.Spec(rank=4, alpha=4, conv_rank=0, text_encoder_rank=2,
                                                            dropout=0.0), SD1, seed=0)
    return pipe


def step_changes_the_adapters(optimizer, pipe) -> bool:
    """One optimizer step on a denoising loss through the text encoder and the UNet: every weight
    finite, some moved. (The tiny adapters are below bitsandbytes' 4096-element 8-bit size.)"""
    trained = [p for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["hnzk girl"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=g)
    pred = pipe.unet(latents, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample
    torch.nn.functional.mse_loss(pred, torch.randn(pred.shape, generator=g)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all(torch.isfinite(p).all() for p in trained) and any(not torch.equal(b, p) for b, p in zip(before, trained))


@pytest.mark.parametrize("settings, built", [
    (dict(optimizer="adamw", use_8bit_adam=False), "AdamW"),
    pytest.param(dict(optimizer="adamw", use_8bit_adam=True), "AdamW8bit", marks=NEEDS_BNB),
    pytest.param(dict(optimizer="adamw8bit", use_8bit_adam=True), "AdamW8bit", marks=NEEDS_BNB),
    pytest.param(dict(optimizer="lion", use_8bit_adam=True), "Lion8bit", marks=NEEDS_BNB),
    pytest.param(dict(optimizer="lion", use_8bit_adam=False), "Lion", marks=NEEDS_BNB),
    pytest.param(dict(optimizer="prodigy", lora_learning_rate=1.0, lora_text_encoder_learning_rate=1.0),
                 "Prodigy", marks=pytest.mark.skipif(not HAS_PRODIGY, reason="prodigyopt not installed "
                                                                          "(pip install prodigyopt)")),
])
def test_each_choice_builds_and_steps_the_tiny_model(make_config, tiny_lora, settings, built):
    config = make_config(**settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback here
        optimizer = optimizers.build(config, tiny_lora.unet, tiny_lora.text_encoder, 1, torch.device("cpu"),
                                     bnb_check=BNB_RUNS)
    assert name_of(optimizer) == built == type(optimizer).__name__
    assert [g["lr"] for g in optimizer.param_groups] == [getattr(config, n) for n in config.learning_rate_settings]
    assert step_changes_the_adapters(optimizer, tiny_lora)


def test_torch_adamw_is_fused_on_a_cpu_from_torch_2_4(make_config, tiny_lora, monkeypatch):
    config = make_config(optimizer="adamw", use_8bit_adam=False)
    optimizer = optimizers.build(config, tiny_lora.unet, tiny_lora.text_encoder, 1, torch.device("cpu"))
    assert optimizer.defaults["fused"] is True  # this machine's torch is 2.13
    monkeypatch.setattr(torch, "__version__", "2.3.1+cu121")  # older: single-tensor, which it takes
    assert not optimizers.fused_adamw(torch.device("cpu")) and optimizers.fused_adamw(torch.device("cuda"))


def one_warning(build) -> tuple[object, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = build()
    assert len(caught) == 1, [str(w.message) for w in caught]
    text = str(caught[0].message)
    assert "\n" not in text
    return optimizer, text


def test_8bit_adam_without_a_gpu_falls_back_to_adamw_with_one_line(make_config, tiny_lora):
    config = make_config(use_8bit_adam=True)
    optimizer, text = one_warning(lambda: optimizers.build(config, tiny_lora.unet, tiny_lora.text_encoder, 1,
                                                           torch.device("cpu")))
    assert type(optimizer) is torch.optim.AdamW
    # installed: bitsandbytes' 8-bit optimizers want CUDA here; missing: how to install it
    assert text.startswith("use_8bit_adam: bitsandbytes")
    assert ("needs a CUDA GPU" if HAS_BNB else "pip install bitsandbytes") in text
    assert "using torch.optim.AdamW" in text


def test_missing_bitsandbytes_names_how_to_install_it(make_config, tiny_lora):
    missing = Check("bitsandbytes", False, "not installed")
    for settings in (dict(optimizer="adamw8bit", use_8bit_adam=True), dict(optimizer="lion")):
        optimizer, text = one_warning(lambda: optimizers.build(make_config(**settings), tiny_lora.unet,
                                                               tiny_lora.text_encoder, 1, torch.device("cpu"),
                                                               bnb_check=missing))
        if settings["optimizer"] == "lion" and hasattr(torch.optim, "Lion"):
            continue  # this torch has its own Lion: no fallback
        assert type(optimizer) is torch.optim.AdamW
        assert "not installed" in text and "pip install bitsandbytes" in text


@pytest.mark.skipif(hasattr(torch.optim, "Lion"), reason="this torch has its own Lion")
def test_lion_without_bitsandbytes_or_torch_lion_falls_back(make_config, tiny_lora):
    optimizer, text = one_warning(lambda: optimizers.build(make_config(optimizer="lion"), tiny_lora.unet,
                                                           tiny_lora.text_encoder, 1, torch.device("cpu")))
    assert type(optimizer) is torch.optim.AdamW
    assert text.startswith("optimizer=lion") and "this torch has no Lion" in text


def test_prodigy_missing_falls_back_to_adamw_at_the_default_rates(make_config, tiny_lora, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    config = make_config(optimizer="prodigy", lora_learning_rate=1.0, lora_text_encoder_learning_rate=1.0)
    optimizer, text = one_warning(lambda: optimizers.build(config, tiny_lora.unet, tiny_lora.text_encoder, 1,
                                                           torch.device("cpu")))
    assert type(optimizer) is torch.optim.AdamW
    # Prodigy's 1.0 as an AdamW step would wreck the model: the defaults are used, and said
    assert [g["lr"] for g in optimizer.param_groups] == [1e-4, 5e-5]
    assert "pip install prodigyopt" in text and "lora_learning_rate=0.0001" in text


@pytest.mark.parametrize("overrides, named", [
    (["optimizer=adamw8bit", "use_8bit_adam=false"], "optimizer=adamw8bit with use_8bit_adam=false"),
    (["optimizer=prodigy"], "learning_rate=1.0"),
    (["optimizer=prodigy", "use_lora=true", "learning_rate=1"], "lora_learning_rate=1.0"),
    (["optimizer=prodigy", "learning_rate=1", "optimizer_in_backward=true"], "optimizer_in_backward"),
    (["optimizer=sgd"], "optimizer"),
])
def test_settings_that_disagree_are_refused_with_the_fix(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=overrides)


def test_mixes_that_agree_are_accepted():
    for overrides in (["optimizer=adamw8bit"], ["optimizer=lion", "use_8bit_adam=true"],
                      ["optimizer=prodigy", "learning_rate=1", "text_encoder_lr=1", "use_8bit_adam=true"],
                      ["optimizer=prodigy", "use_lora=true", "lora_learning_rate=1", "lora_text_encoder_rank=4",
                       "lora_text_encoder_learning_rate=0.5"]):
        load_config(overrides=overrides)
    assert optimizers.wanted(Config()) == "adamw8bit"  # the defaults keep meaning what they always did


@pytest.mark.skipif(not HAS_PRODIGY, reason="prodigyopt not installed (pip install prodigyopt)")
def test_the_optimizer_survives_resume_and_a_resume_that_would_build_another_stops(make_config, monkeypatch):
    config = make_config(optimizer="prodigy", lora_learning_rate=1.0, lora_text_encoder_learning_rate=1.0)
    run = RunFolder(train(config, progress=False).run_dir)
    assert json.loads((run.pick(2).path / "state" / "trainer.json").read_text())["optimizer"] == "Prodigy"
    longer = config.replace(max_train_steps=3)
    with pytest.raises(ConfigError, match="optimizer"):  # the setting is not one resume may change
        train(longer.replace(optimizer="adamw"), resume="latest", progress=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "prodigyopt" else real(name, *a))
    with pytest.warns(UserWarning, match="prodigyopt"), pytest.raises(CheckpointError, match="Prodigy's"):
        train(longer, resume="latest", progress=False)
    monkeypatch.undo()
    train(longer, resume="latest", progress=False)
    assert json.loads((run.pick(3).path / "state" / "trainer.json").read_text())["optimizer"] == "Prodigy"
