"""SDXL LoRA files (issue 33 item 3) and clip_skip (item 1, both families): a tiny SDXL LoRA run
with both text encoders' adapters at their own rates, exported by `dbnb export RUN` in kohya's SDXL
layout and read back by diffusers' loader equal to the checkpoint; clip_skip as the webui, kohya
and diffusers' pipelines mean it, in training, renders and the files' metadata."""
import json

import pytest
import torch
from safetensors import safe_open

from dbnb.core.config import Config, ConfigError
from dbnb.family import base
from dbnb.family.sd1.family import SD1
from dbnb.family.sdxl.family import SDXL
from dbnb.run.folder import RunFolder
from dbnb.ship import kohya
from dbnb.train import optimizers
from dbnb.train.loop import train
from dbnb.world.demo import write_dataset

RATES = dict(lora_learning_rate=1e-2, lora_text_encoder_learning_rate=1e-2, lora_text_encoder_2_learning_rate=5e-3)


def _config(source, root, **overrides) -> Config:
    instance, _ = write_dataset(root / "data", n_instance=2)
    return Config(**{**dict(pretrained_model_name_or_path=str(source), instance_data_dir=str(instance),
                            instance_prompt="hnzk girl", output_dir=str(root / "runs"), run_name="xl", resolution=64,
                            max_train_steps=2, save_every_steps=0, use_lora=True, lora_rank=4, lora_alpha=2.0,
                            lora_text_encoder_rank=2, lr_warmup_steps=0, mixed_precision="no", use_8bit_adam=False,
                            gradient_checkpointing=False, **RATES), **overrides})


@pytest.fixture(scope="module")
def xl_run(tiny_sdxl, tmp_path_factory):
    return train(_config(tiny_sdxl, tmp_path_factory.mktemp("sdxl-lora")), progress=False).run_dir


def _checkpoint_outputs(run_dir, source):
    models = SDXL.open(str(source))
    RunFolder(run_dir).pick(None).load_into(models.denoiser, models.encoder)
    return kohya.outputs(models, SDXL)


def test_dbnb_export_writes_kohyas_sdxl_layout_that_diffusers_reads_back_as_trained(xl_run, tiny_sdxl):
    from dbnb.faces.cli import main

    assert main(["export", str(xl_run), "--precision", "fp32"]) == 0  # verified on the way
    path = xl_run / "exports" / "xl_2.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = {k.split(".")[0] for k in keys}
    assert keys == {f"{m}.{w}" for m in modules for w in ("lora_down.weight", "lora_up.weight", "alpha")}
    by_prefix = {p: {m for m in modules if m.startswith(p)} for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert set().union(*by_prefix.values()) == modules and all(by_prefix.values())
    # the names ComfyUI's comfy/lora.py maps for SDXL's CLIP-L and bigG (and the webui's networks)
    for prefix in ("lora_te1_", "lora_te2_"):
        assert f"{prefix}text_model_encoder_layers_0_self_attn_q_proj" in modules
        assert f"{prefix}text_model_encoder_layers_2_mlp_fc2" in modules
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_v_parameterization"]) == \
        ("sdxl_base_v1-0", "False", "False")
    assert (meta["ss_resolution"], meta["ss_clip_skip"], meta["ss_network_dim"]) == ("(64, 64)", "2", "4")
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.01", "0.01")
    assert json.loads(meta["dbnb_text_encoder_lrs"]) == {"te1": "0.01", "te2": "0.005"}

    expected = _checkpoint_outputs(xl_run, tiny_sdxl)
    models = SDXL.open(str(tiny_sdxl))
    untouched = kohya.outputs(models, SDXL, conditioning=expected[0])
    kohya.load_file_into(models, path, SDXL.parts)  # diffusers' load_lora_weights; every module must land
    got = kohya.outputs(models, SDXL, conditioning=expected[0])
    for read_back, base_model in zip(kohya.differences(expected, got), kohya.differences(expected, untouched)):
        assert read_back <= 1e-4
        assert base_model > 1e-3  # the LoRA changes both encoders' conditioning and the UNet: the check can fail


def test_an_sdxl_lora_of_the_unet_alone_on_a_v_prediction_base_exports_unet_keys_saying_v(tiny_sdxl, tmp_path):
    """NoobAI-XL v-pred's folder says v_prediction in its scheduler config; its LoRA says so as sd-scripts' does."""
    import shutil

    from dbnb.ship.export import export

    vpred = shutil.copytree(tiny_sdxl, tmp_path / "vpred")
    scheduler = vpred / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    run_dir = train(_config(vpred, tmp_path, lora_text_encoder_rank=0, max_train_steps=1), progress=False).run_dir
    result = export(run_dir)
    with safe_open(str(result.path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert result.verified and keys and all(k.startswith("lora_unet_") for k in keys)
    assert meta["ss_text_encoder_lr"] == "0" and json.loads(meta["dbnb_text_encoder_lrs"]) == {"te1": "0", "te2": "0"}
    assert meta["ss_v_parameterization"] == "True"


def test_each_sdxl_text_encoder_learns_at_its_own_rate_and_sd1_ignores_the_second(make_config, tiny_sdxl):
    cpu = torch.device("cpu")
    config = make_config(pretrained_model_name_or_path=str(tiny_sdxl), use_lora=True, lora_rank=2,
                         lora_text_encoder_rank=2, **RATES)
    models = SDXL.load(config, cpu, torch.float32)
    optimizer = optimizers.build(config, models.denoiser, models.encoder, 1, cpu, encoders=SDXL.parts.encoder.members)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2, 5e-3]
    for group, name in zip(optimizer.param_groups[1:], ("te1", "te2")):
        trained = [p for p in models.encoder[name].parameters() if p.requires_grad]
        assert trained and [id(p) for p in group["params"]] == [id(p) for p in trained]
    same = config.replace(lora_text_encoder_2_learning_rate=0.0)  # 0: the first encoder's rate
    assert [g["lr"] for g in optimizers.build(same, models.denoiser, models.encoder, 1, cpu,
                                              encoders=SDXL.parts.encoder.members).param_groups] == [1e-2] * 3
    unet_only = config.replace(lora_text_encoder_rank=0)  # text-encoder adapters stay optional
    assert len(optimizers.build(unet_only, models.denoiser, models.encoder, 1, cpu,
                                encoders=SDXL.parts.encoder.members).param_groups) == 1
    with pytest.raises(ConfigError, match=r"prodigy with lora_text_encoder_2_learning_rate=0.005.*set lora_text_"):
        config.replace(optimizer="prodigy", lora_learning_rate=1.0, lora_text_encoder_learning_rate=1.0)
    sd1 = make_config(use_lora=True, lora_rank=2, lora_text_encoder_rank=2, **RATES)
    sd1_models = SD1.load(sd1, cpu, torch.float32)
    assert [g["lr"] for g in optimizers.build(sd1, sd1_models.denoiser, sd1_models.encoder, 1, cpu,
                                              encoders=SD1.parts.encoder.members).param_groups] == [1e-2, 1e-2]


# --- clip_skip -------------------------------------------------------------------------------------

def _tokens(models, prompt):
    return {name: tokenize([prompt], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids for name, tokenize in models.tokenizers.items()}


def test_sd1_clip_skip_2_is_the_penultimate_layer_as_diffusers_pipeline_renders_clip_skip_1(tiny_dir):
    models, prompt = SD1.open(str(tiny_dir)), "hnzk girl, 1girl, solo"
    with torch.no_grad():
        skipped = SD1.encode_prompts(models.encoder, _tokens(models, prompt), clip_skip=2)["hidden_states"]
        last = SD1.encode_prompts(models.encoder, _tokens(models, prompt))["hidden_states"]
        rendered = models.pipe.encode_prompt(prompt, "cpu", 1, False,
                                             clip_skip=base.pipeline_clip_skip(SD1, 2))[0]
        plain = models.pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=base.pipeline_clip_skip(SD1, 0))[0]
    assert base.pipeline_clip_skip(SD1, 2) == 1 and base.pipeline_clip_skip(SD1, 1) is None
    torch.testing.assert_close(skipped, rendered, rtol=0, atol=0)
    torch.testing.assert_close(last, plain, rtol=0, atol=0)
    assert (skipped - last).abs().max() > 1e-3
    with pytest.raises(base.ClipSkipError, match=r"clip_skip=3: this text encoder has 2 layers"):
        SD1.encode_prompts(models.encoder, _tokens(models, prompt), clip_skip=3)


def test_sdxl_takes_only_its_own_penultimate_layer_and_names_the_setting_otherwise(tiny_sdxl, make_config):
    models = SDXL.open(str(tiny_sdxl))
    inputs = _tokens(models, "hnzk girl")
    with torch.no_grad():
        own, two = (SDXL.encode_prompts(models.encoder, inputs, clip_skip=c)["hidden_states"] for c in (0, 2))
    assert torch.equal(own, two)
    assert base.pipeline_clip_skip(SDXL, 0) is None and base.pipeline_clip_skip(SDXL, 2) is None
    for wrong in (1, 3):
        with pytest.raises(base.ClipSkipError, match=rf"clip_skip={wrong}: sdxl models take clip_skip 2 .*or 0"):
            base.pipeline_clip_skip(SDXL, wrong)
    with pytest.raises(base.ClipSkipError, match="clip_skip=1"):  # before the model loads
        SDXL.load(make_config(pretrained_model_name_or_path=str(tiny_sdxl), clip_skip=1), torch.device("cpu"),
                  torch.float32)
    with pytest.raises(ConfigError, match="clip_skip"):
        make_config(clip_skip=13)


def test_an_sd1_lora_trained_at_clip_skip_2_previews_at_it_and_its_files_say_so(tiny_dir, tmp_path):
    from dbnb.ship.export import export

    config = _config(tiny_dir, tmp_path, run_name="cs2", clip_skip=2, max_train_steps=1, lora_text_encoder_rank=0,
                     sample_every_steps=1, num_samples=1, sample_steps=2)
    run_dir = train(config, progress=False).run_dir
    assert RunFolder(run_dir).preview_grids()  # rendered through diffusers' pipeline at its clip_skip=1
    with safe_open(str(export(run_dir).path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_clip_skip"], meta["ss_base_model_version"], meta["ss_text_encoder_lr"]) == ("2", "sd_v1", "0")
    assert "dbnb_text_encoder_lrs" not in meta  # one text encoder: kohya's field says it
    with safe_open(str(export(run_dir, bake=True).path), "pt") as f:  # the full model file says it too
        assert f.metadata()["ss_clip_skip"] == "2"
