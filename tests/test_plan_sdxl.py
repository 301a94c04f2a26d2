"""The memory planner and memory_profile=auto on SDXL: the tiny SDXL traced against the parts
SDXLFamily.load really sets up, the full-size SDXL 1.0 skeleton (dbnb/assets/sdxl) planned on the
meta device from the shipped traces, auto's tiers on a T4 and a 40 GB card, and the refusal of a
full fine-tune below 40 GB."""
import pytest
import torch

from dbnb.core.config import Config, ConfigError
from dbnb.faces.cli import main
from dbnb.family.sdxl.family import SDXL
from dbnb.family.sdxl.memory import SKELETON, auto_settings
from dbnb.train.memory import apply_memory_profile, choose, refusal, verdict
from dbnb.train.planner import GIB, SHIPPED, _read, card, plan, step_trace, trace_key

FULL_SIZE = str(SKELETON)
T4_LORA = {"use_lora": True, "resolution": 1024, "mixed_precision": "fp16", "gradient_checkpointing": True,
           "use_8bit_adam": True}
FULL_BF16 = {"use_lora": False, "train_text_encoder": False, "resolution": 1024, "mixed_precision": "bf16",
             "gradient_checkpointing": True, "use_8bit_adam": True}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A trace not shipped is kept in this test's folder, never in the user's cache."""
    monkeypatch.setenv("DBNB_CACHE", str(tmp_path))


def sdxl_config(source, **settings) -> Config:
    return Config(pretrained_model_name_or_path=str(source), **settings)


def held_bytes(*modules) -> int:
    return sum(t.untyped_storage().nbytes() for m in modules for t in (*m.parameters(), *m.buffers()))


@pytest.mark.parametrize("settings", [{"use_lora": True, "mixed_precision": "fp16"},
                                      {"use_lora": False, "train_text_encoder": False, "mixed_precision": "bf16"},
                                      {"use_lora": False, "train_text_encoder": True, "mixed_precision": "fp16"}])
def test_the_trace_holds_what_sdxl_load_sets_up(tiny_sdxl, settings):
    """The planner's meta-device parts are SDXLFamily.load's, as set up to train: the same bytes on
    the device, the same trained tensors (LoRA's adapters, or the whole UNet in fp32, with both
    fine-tuned text encoders when train_text_encoder)."""
    config = sdxl_config(tiny_sdxl, resolution=64, gradient_checkpointing=True, **settings)
    dtype = torch.float16 if settings["mixed_precision"] == "fp16" else torch.bfloat16
    models = SDXL.load(config, torch.device("cpu"), dtype)
    trace = step_trace(config, cache=False)
    assert trace.weights == held_bytes(models.denoiser, models.encoder)
    assert trace.encoder == held_bytes(models.encoder)
    assert trace.autoencoder == held_bytes(models.autoencoder)
    trained = tuple(p.numel() for m in (models.denoiser, models.encoder) for p in m.parameters() if p.requires_grad)
    assert trace.trained == trained and trace.gradients > 0
    if config.fine_tunes_text_encoder:  # both encoders' gradients and optimizer state are counted
        encoders = sum(p.numel() for p in models.encoder.parameters())
        assert sum(trace.trained) == sum(p.numel() for p in models.denoiser.parameters()) + encoders
        unet_only = config.replace(train_text_encoder=False)
        frozen = step_trace(unet_only, cache=False)
        gradients = trace.gradients - frozen.gradients  # fp32; CLIP-L's unused last layer gets none
        assert gradients >= 4 * sum(p.numel() for p in models.encoder["te2"].parameters())


def test_sdxl_loads_its_frozen_parts_in_half_precision(tiny_sdxl):
    """LoRA in fp16 reads no fp32 copy of the frozen parts (a full-size SDXL's would be 13 GiB of
    system RAM); the VAE stays fp32, and a fully trained UNet keeps fp32 master weights."""
    lora = SDXL.load(sdxl_config(tiny_sdxl, use_lora=True), torch.device("cpu"), torch.bfloat16)
    assert lora.denoiser.dtype == torch.bfloat16 and lora.autoencoder.dtype == torch.float32
    full = SDXL.load(sdxl_config(tiny_sdxl, train_text_encoder=False), torch.device("cpu"), torch.float16)
    assert full.denoiser.dtype == torch.float32 and full.encoder["te2"].dtype == torch.float16


def test_the_full_size_t4_lora_fits_a_t4_from_the_shipped_trace():
    """SDXL 1.0's size, planned from the shipped trace (traced on the meta device by
    bench/bench_plan.py --write): the LoRA step at 1024 px fits a T4 once the latents are cached
    outside the chunked cache phase, and the frozen weights in fp16 are the UNet's 2.57 B and the
    encoders' 0.82 B parameters at 2 bytes."""
    config = sdxl_config(FULL_SIZE, cache_latents=False, **T4_LORA)
    assert trace_key(config) in _read(SHIPPED)
    trace = step_trace(config)
    predicted = plan(config, trace)
    frozen = 2 * (2_567_463_684 + 123_060_480 + 694_659_840)
    assert predicted.parts["weights"] == pytest.approx(frozen + trace.trained_bytes, rel=1e-5)  # + the fp32 adapters
    assert predicted.fits(card("T4")["total_vram_gib"])
    assert predicted.ram["load"] < 12 * GIB  # Colab's 12.7 GB: read in fp16, not fp32
    assert predicted.ram["export"] < 12 * GIB  # the parts once, in fp16 (bench_sdxl_ram.py measured 7.7 GiB)


def test_notebook_04s_defaults_fit_sdxl_lora_on_a_t4_latent_cache_included():
    """cache_latents on (notebook 04's default): the cache encodes 2 pictures at a time at 1024 px
    (dbnb.data.batches.cache_chunk), not SD 1.x's 8, so its phase fits a T4 too."""
    from dbnb.data.batches import cache_chunk

    assert (cache_chunk(512, 512), cache_chunk(1024, 1024), cache_chunk(64, 64)) == (8, 2, 8)
    config = sdxl_config(FULL_SIZE, cache_latents=True, **T4_LORA)
    assert trace_key(config) in _read(SHIPPED)
    predicted = plan(config, step_trace(config))
    assert predicted.fits(card("T4")["total_vram_gib"]), predicted.table()


def test_cached_text_embeddings_take_the_encoders_off_the_card():
    """cache_text_embeddings keeps the frozen encoders off the GPU: the training phases lose exactly
    their weights."""
    config = sdxl_config(FULL_SIZE, **T4_LORA)
    trace = step_trace(config)
    cached = sdxl_config(FULL_SIZE, **T4_LORA, cache_text_embeddings=True)
    without, with_cache = plan(config, trace), plan(cached, trace)
    assert trace.encoder > 1.5 * GIB
    assert without.phases["forward/backward"] - with_cache.phases["forward/backward"] == trace.encoder


def test_auto_tiers_cache_text_embeddings_only_for_frozen_encoders():
    frozen = sdxl_config(FULL_SIZE, use_lora=True)
    assert auto_settings(frozen) == [{"cache_latents": True, "cache_text_embeddings": True},
                                     {"cache_latents": False, "cache_text_embeddings": True}]
    learning = sdxl_config(FULL_SIZE, use_lora=True, lora_text_encoder_rank=8)
    assert auto_settings(learning) == [{"cache_latents": True}, {"cache_latents": False}]


def test_auto_fits_sdxl_lora_on_a_t4_in_fp16():
    choice = choose(sdxl_config(FULL_SIZE, use_lora=True, resolution=1024, memory_profile="auto"), card("T4"))
    assert choice.fits, choice.message
    assert choice.settings["mixed_precision"] == "fp16" and choice.settings["cache_text_embeddings"]
    assert choice.predicted_gib + 0.5 <= card("T4")["total_vram_gib"]


def test_auto_trains_full_sdxl_on_a_40_gb_card_in_bf16():
    choice = choose(sdxl_config(FULL_SIZE, memory_profile="auto", **FULL_BF16), card("A100-40"))
    assert choice.fits, choice.message
    assert choice.settings["mixed_precision"] == "bf16"


def test_full_dreambooth_with_both_text_encoders_fits_a_40_gb_card_from_the_shipped_trace():
    """The guide's full DreamBooth on SDXL 1.0's size (train_text_encoder: notebook 04's default on a
    40 GB card) is planned from the shipped trace with both encoders' 0.82 B parameters trained."""
    config = sdxl_config(FULL_SIZE, memory_profile="auto", **{**FULL_BF16, "train_text_encoder": True})
    assert trace_key(config) in _read(SHIPPED)
    assert sum(step_trace(config).trained) == 2_567_463_684 + 123_060_480 + 694_659_840
    choice = choose(config, card("A100-40"))
    assert choice.fits, choice.message
    assert choice.predicted_gib > choose(config.replace(train_text_encoder=False), card("A100-40")).predicted_gib


@pytest.mark.parametrize("profile", ["auto", "manual"])
def test_a_full_sdxl_fine_tune_is_refused_below_40_gb(profile):
    config = sdxl_config(FULL_SIZE, memory_profile=profile, **FULL_BF16)
    l4 = card("L4")
    fits, line = verdict(config, l4)
    assert not fits and "L4 (22.1 GiB)" in line and "use_lora=true" in line and "40 GB" in line
    with pytest.raises(ConfigError, match="L4 .*use_lora=false.*Set use_lora=true"):
        apply_memory_profile(config, gpu=l4)
    assert refusal(config, card("A100-40")) is None and refusal(config.replace(use_lora=True), l4) is None


def test_cli_plan_answers_for_the_tiny_sdxl(tiny_sdxl, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"pretrained_model_name_or_path: {tiny_sdxl}\nresolution: 64\nuse_lora: true\n"
                      "mixed_precision: fp16\n")
    assert main(["plan", str(config), "--card", "T4"]) == 0
    out = capsys.readouterr().out
    assert "T4: fits (14.7 GiB)" in out and "forward/backward" in out and "system RAM" in out
