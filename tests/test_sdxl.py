"""The SDXL family (issue 33, first slice): recognized from a diffusers folder, loaded, its
prompts encoded by both text encoders with the pooled embedding and the time ids, and trained
(full UNet and LoRA on the UNet and both encoders) through the real trainer, resuming exactly."""
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_learnt_and_resumed_exactly, assert_test_grids

from dbnb.family import base, lora
from dbnb.family.sd1.family import SD1
from dbnb.family.source import ModelLoadError
from dbnb.family.sdxl.family import SDXL, SDXLError, square_time_ids
from dbnb.world.tiny_sdxl import PROJECTION, WIDTHS

# --- which family ------------------------------------------------------------------------------

def test_sdxl_folders_are_sdxl_and_everything_else_stays_sd1(tiny_sdxl, tiny_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    assert isinstance(SDXL, base.Family)
    assert base.for_model(str(tiny_sdxl)) is SDXL and base.named("sdxl") is SDXL
    assert base.for_model(str(tiny_dir)) is SD1 and base.for_model("org/any-model") is SD1
    # a folder whose index names another pipeline: its UNet's time-id conditioning still says SDXL
    renamed = Path(shutil.copytree(tiny_sdxl, tmp_path / "renamed"))
    index = json.loads((renamed / "model_index.json").read_text())
    (renamed / "model_index.json").write_text(json.dumps({**index, "_class_name": "DiffusionPipeline"}))
    assert base.for_model(str(renamed)) is SDXL
    # a single file in the original layout: recognized; one of no shape dbnb ships a config for is named as such
    single = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(2)}, str(single))
    assert base.for_model(str(single)) is SDXL
    with pytest.raises(ModelLoadError, match=r"xl.safetensors.*not SDXL 1.0's shape.*Use an SDXL base model"):
        SDXL.open(str(single))


# --- the conditioning ----------------------------------------------------------------------------

def test_prompts_and_time_ids_are_what_diffusers_sdxl_pipeline_makes(tiny_sdxl):
    models = SDXL.open(str(tiny_sdxl))
    prompt = "hnzk girl, 1girl, solo"
    inputs = {name: tokenizer([prompt], padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids for name, tokenizer in models.tokenizers.items()}
    with torch.no_grad():
        mine = SDXL.encode_prompts(models.encoder, inputs)
        hidden, _, pooled, _ = models.pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert mine["hidden_states"].shape[-1] == sum(WIDTHS) and "time_ids" not in mine
    torch.testing.assert_close(mine["hidden_states"], hidden, rtol=0, atol=0)
    torch.testing.assert_close(mine["text_embeds"], pooled, rtol=0, atol=0)
    # bucketing off: (resolution, resolution), (0, 0), (resolution, resolution), from the latents' size
    want = models.pipe._get_add_time_ids((64, 96), (0, 0), (64, 96), dtype=torch.float32,
                                         text_encoder_projection_dim=PROJECTION)
    assert torch.equal(square_time_ids(torch.zeros(2, 4, 8, 12)), want.expand(2, 6))
    # bucketing on: each picture's sizes and crop, as the batches carry them
    sizes = {"original_size": torch.tensor([[90, 60]]), "crops_coords_top_left": torch.tensor([[3, 0]]),
             "target_size": torch.tensor([[64, 48]])}
    with torch.no_grad():
        bucketed = SDXL.encode_prompts(models.encoder, {**inputs, **sizes})
    assert bucketed["time_ids"].tolist() == [[90, 60, 3, 0, 64, 48]]


# --- training through the real trainer -----------------------------------------------------------

def _log(run) -> list[dict]:
    return [json.loads(x) for x in (run.run_dir / "logs" / "train.jsonl").read_text().splitlines()]


def test_sdxl_unet_trains_and_resumes_exactly_through_the_real_trainer(make_config, tiny_sdxl):
    from dbnb.run.checkpoints import RunFolder
    from dbnb.train.loop import train

    settings = {"pretrained_model_name_or_path": str(tiny_sdxl), "max_train_steps": 4, "save_every_steps": 2,
                "learning_rate": 1e-3}
    config = lambda **kw: make_config(**{**settings, **kw})  # noqa: E731
    straight = train(config(run_name="straight", sample_every_steps=4, num_samples=1, sample_steps=2),
                     progress=False)
    train(config(run_name="resumed", max_train_steps=2), progress=False)
    resumed = train(config(run_name="resumed"), resume="latest", progress=False)

    assert (straight.step, resumed.step) == (4, 4)
    assert [r["step"] for r in _log(resumed)] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(resumed))
    assert json.loads(RunFolder(resumed.run_dir).base_path.read_text())["family"] == "sdxl"
    assert [p.parent.name for p in RunFolder(straight.run_dir).preview_grids()] == ["step-000004"]
    assert_learnt_and_resumed_exactly(straight.run_dir, resumed.run_dir,
                                      tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors", 4)
    assert_test_grids(resumed.run_dir, 4)  # through SDXL's open() and pipeline()


def test_sdxl_lora_on_the_unet_and_both_encoders_trains_and_resumes_exactly(make_config, tiny_sdxl):
    from dbnb.run.checkpoints import RunFolder
    from dbnb.train.loop import train

    settings = {"pretrained_model_name_or_path": str(tiny_sdxl), "max_train_steps": 2, "save_every_steps": 1,
                "use_lora": True, "lora_rank": 4, "lora_text_encoder_rank": 2, "train_text_encoder": True,
                "learning_rate": 1e-3, "gradient_checkpointing": True,
                "bucketing": True}  # bucketing: the time ids come from the batches
    config = lambda **kw: make_config(**{**settings, **kw})  # noqa: E731
    straight = train(config(run_name="straight"), progress=False)
    train(config(run_name="resumed", max_train_steps=1), progress=False)
    resumed = train(config(run_name="resumed"), resume="latest", progress=False)

    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _log(resumed))
    checkpoint = RunFolder(resumed.run_dir).pick(2)
    assert checkpoint.kind == "lora" and checkpoint.parts >= {"unet", "text_encoders"}
    _, unet, encoders = checkpoint.adapters()
    assert unet and {k.split(".")[0] for k in encoders} == {"te1", "te2"}  # kohya's lora_te1_ / lora_te2_
    assert any(v.abs().sum() > 0 for k, v in encoders.items() if "lora_B" in k)  # the encoders learnt
    _, *want = RunFolder(straight.run_dir).pick(2).adapters()
    for mine, theirs in zip((unet, encoders), want):
        assert mine.keys() == theirs.keys()
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    fresh = SDXL.open(str(tiny_sdxl))  # onto a fresh base model: the adapters go where they were trained
    checkpoint.load_into(fresh.denoiser, fresh.encoder)
    assert all(torch.equal(lora.adapter_state(fresh.encoder)[k], v) for k, v in encoders.items())


def test_sdxl_fine_tunes_both_text_encoders_in_fp32_beside_the_half_precision_vae_rule(make_config, tiny_sdxl):
    """train_text_encoder with use_lora off (full DreamBooth, issue 33 item 3; trained and saved in
    tests/test_sdxl_te.py): both encoders learn from fp32 master weights under fp16 mixed precision."""
    config = make_config(pretrained_model_name_or_path=str(tiny_sdxl), train_text_encoder=True)
    models = SDXL.load(config, torch.device("cpu"), torch.float16)
    for name in ("te1", "te2"):
        params = list(models.encoder[name].parameters())
        assert all(p.requires_grad and p.dtype == torch.float32 for p in params), name
    assert models.denoiser.dtype == torch.float32 and not any(p.requires_grad for p in models.autoencoder.parameters())


def test_a_v_prediction_sdxl_base_trains_and_renders_as_its_scheduler_says(make_config, tiny_sdxl, tmp_path):
    """NoobAI-XL v-pred's folder says v_prediction (and zero-terminal SNR) in its scheduler config."""
    import shutil

    vpred = Path(shutil.copytree(tiny_sdxl, tmp_path / "vpred"))
    scheduler = vpred / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction",
                                     "rescale_betas_zero_snr": True}))
    models = SDXL.load(make_config(pretrained_model_name_or_path=str(vpred)), torch.device("cpu"), torch.float32)
    trained = models.noise_scheduler.config
    assert trained.prediction_type == "v_prediction" and trained.rescale_betas_zero_snr
    assert models.noise_scheduler.alphas_cumprod[-1] < 1e-6  # the last step is pure noise
    rendered = SDXL.pipeline(models, models.denoiser).scheduler.config
    assert rendered.prediction_type == "v_prediction" and rendered.rescale_betas_zero_snr


def test_a_replacement_vae_keeps_the_bases_latent_scale(tiny_sdxl, tiny_dir, make_config, tmp_path):
    """An fp16-fix VAE shares SDXL's latent space: whatever scale its file or folder says, the base's holds."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    models = SDXL.open(str(tiny_sdxl), autoencoder=str(tiny_dir / "vae"))  # another VAE, SD 1.5's scale
    assert models.autoencoder.config.scaling_factor == models.latent_scale == 0.13025
    theirs = load_file(str(tiny_dir / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(models.autoencoder.state_dict()[k], v) for k, v in theirs.items())
    # a VAE that halves pictures twice, not three times: refused before training on the wrong latents
    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8).save_pretrained(tmp_path / "vae4")
    config = make_config(pretrained_model_name_or_path=str(tiny_sdxl),
                         pretrained_vae_name_or_path=str(tmp_path / "vae4"))
    with pytest.raises(SDXLError, match=r"vae4\) does not scale pictures by 8.*pretrained_vae_name_or_path"):
        SDXL.load(config, torch.device("cpu"), torch.float32)
