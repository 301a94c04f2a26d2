"""memory_profile=auto: the settings the planner chooses for faked GPUs (the VRAM is passed in), and the
trainer applying it. SD 1.5's default config: its traces ship with dbnb (dbnb/assets/plan)."""
import json

import pytest
import torch

from dbnb.core.config import Config, ConfigError
from dbnb.train.memory import apply_memory_profile, candidates, choose
from dbnb.train.planner import plan

# What torch reports for these cards (total_vram_gib as dbnb.core.hardware.cuda_summary() gives it).
T4 = {"name": "Tesla T4", "total_vram_gib": 14.74, "bf16": False}
RTX3060 = {"name": "NVIDIA GeForce RTX 3060", "total_vram_gib": 11.76, "bf16": True}
A10G = {"name": "NVIDIA A10G", "total_vram_gib": 22.07, "bf16": True}
V100_32 = {"name": "Tesla V100-SXM2-32GB", "total_vram_gib": 31.74, "bf16": False}
A100_40 = {"name": "NVIDIA A100-SXM4-40GB", "total_vram_gib": 39.39, "bf16": True}
RTX8000 = {"name": "Quadro RTX 8000", "total_vram_gib": 47.46, "bf16": False}
SMALL = {"name": "GeForce GTX 1070", "total_vram_gib": 7.92, "bf16": False}


def memory(settings: dict) -> tuple:
    return settings["mixed_precision"], settings["use_8bit_adam"], settings["gradient_checkpointing"]


@pytest.mark.parametrize("gpu", [T4, RTX3060, A10G, V100_32, A100_40, RTX8000])
def test_auto_takes_the_fastest_settings_the_planner_says_fit(gpu):
    config = Config()
    chosen = choose(config, gpu)
    tried = candidates(config, gpu["bf16"])
    assert chosen.fits and plan(config.replace(**chosen.settings)).fits(gpu["total_vram_gib"])
    for faster in tried[:tried.index(chosen.settings)]:
        assert not plan(config.replace(**faster)).fits(gpu["total_vram_gib"])
    assert chosen.settings["mixed_precision"] == ("bf16" if gpu["bf16"] else "fp16")


def test_what_auto_chooses_on_common_cards():
    """AdamW's fp32 state (8 bytes a weight, UNet and text encoder) does not fit a T4; a 40 GB card takes everything off."""
    assert memory(choose(Config(), T4).settings)[1] is True
    assert memory(choose(Config(), A100_40).settings) == ("bf16", False, False)
    assert memory(choose(Config(), RTX8000).settings) == ("fp16", False, False)  # 48 GB but no bf16
    assert memory(choose(Config(), None).settings) == ("no", False, False)


@pytest.mark.parametrize("card, precision", [(("Quadro RTX 8000", 47.46, (7, 5)), "fp16"),
                                             (("NVIDIA A100-SXM4-80GB", 79.25, (8, 0)), "bf16")])
def test_auto_picks_bf16_by_compute_capability(fake_gpu, card, precision, capsys):
    """A 48 GB Turing card lands in the bf16 tier by VRAM; torch >= 2.3 calls bf16 supported on it."""
    fake_gpu(*card)
    assert torch.cuda.is_bf16_supported()
    chosen = apply_memory_profile(Config(memory_profile="auto"))  # asks torch, as a run does
    assert chosen.mixed_precision == precision
    assert card[0] in capsys.readouterr().out


def test_choice_says_what_and_why():
    choice = choose(Config(), T4)
    assert "Tesla T4" in choice.message and "14.7 GiB" in choice.message
    assert "use_8bit_adam=true" in choice.message and "predicted peak" in choice.message and "planner" in choice.message
    assert choice.predicted_gib < T4["total_vram_gib"]


def test_a_card_too_small_for_every_setting_is_warned():
    choice = choose(Config(), SMALL)
    assert not choice.fits and "may run out of memory" in choice.message
    assert memory(choice.settings) == ("fp16", True, True)  # the most memory-saving of the candidates
    assert "may run out of memory" not in choose(Config(), T4).message


def test_manual_leaves_the_config_alone(capsys):
    config = Config(mixed_precision="no", use_8bit_adam=False, gradient_checkpointing=False)
    assert apply_memory_profile(config, T4) is config
    assert capsys.readouterr().out == ""


def test_auto_replaces_the_three_settings_and_prints_the_choice(capsys):
    config = Config(memory_profile="auto", mixed_precision="no", use_8bit_adam=False,
                    gradient_checkpointing=False, learning_rate=2e-6)
    chosen = apply_memory_profile(config, T4)
    assert memory(chosen.to_dict()) == memory(choose(config, T4).settings)
    assert chosen.use_8bit_adam and chosen.learning_rate == 2e-6 and chosen.memory_profile == "auto"
    assert "memory_profile=auto: Tesla T4" in capsys.readouterr().out


def test_auto_refuses_fp16_with_optimizer_in_backward():
    config = Config(memory_profile="auto", optimizer_in_backward=True, max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="optimizer_in_backward"):
        apply_memory_profile(config, T4)
    assert apply_memory_profile(config, A100_40).mixed_precision == "bf16"


def test_auto_keeps_8bit_adam_where_the_optimizer_asks_for_it(capsys):
    """optimizer=adamw8bit on a 40 GB card, where AdamW fits: auto only tries 8-bit ones; no GPU keeps it too."""
    assert all(settings["use_8bit_adam"] for settings in candidates(Config(optimizer="adamw8bit"), True))
    for gpu in (A100_40, None):
        chosen = apply_memory_profile(Config(memory_profile="auto", optimizer="adamw8bit"), gpu)
        assert chosen.use_8bit_adam and chosen.optimizer == "adamw8bit"
    assert "optimizer=adamw8bit asks for it" in capsys.readouterr().out
    assert not apply_memory_profile(Config(memory_profile="auto", optimizer="adamw"), A100_40).use_8bit_adam


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU choice")
def test_train_applies_auto_at_its_start(tiny_dir, tmp_path, capsys):
    """The defaults (fp16, 8-bit Adam) cannot train on a CPU; memory_profile=auto makes them fit it."""
    from dbnb.train.loop import train
    from dbnb.world.demo import INSTANCE_PROMPT, write_dataset

    instance, _ = write_dataset(tmp_path / "data", n_instance=2)
    config = Config(pretrained_model_name_or_path=str(tiny_dir), instance_data_dir=str(instance),
                    instance_prompt=INSTANCE_PROMPT, output_dir=str(tmp_path / "runs"), resolution=64,
                    max_train_steps=1, save_every_steps=0, lr_warmup_steps=0, memory_profile="auto")
    assert config.mixed_precision == "fp16"
    result = train(config, progress=False)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert memory(saved) == ("no", False, False)
    assert "memory_profile=auto: no CUDA GPU" in capsys.readouterr().out


def test_auto_falls_back_to_every_memory_option_when_the_planner_cannot_size_the_run(tmp_path):
    """A base model whose config the planner cannot build: auto still lets the run start, all savers on."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "block_out_channels": []}')
    choice = choose(Config(pretrained_model_name_or_path=str(tmp_path)), T4)
    assert memory(choice.settings) == ("fp16", True, True) and "could not size this run" in choice.message
