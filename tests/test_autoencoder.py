"""dbnb.family.sd1.autoencoder: every path that runs the VAE (class images, previews, test images, the latent
cache and live training batches) runs it in fp32, so a VAE that overflows in fp16, as anime VAEs
do, still gives pictures and finite latents when the rest of the model is in fp16."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dbnb.core.config import Config
from dbnb.data.batches import cache_latents, latent_batch, read_images
from dbnb.family.sd1 import autoencoder
from dbnb.family.sd1.family import SD1
from dbnb.prep import classimages as ci
from dbnb.train.previews import write_previews
from dbnb.world.demo import write_dataset
from dbnb.world.tiny import build_tiny_pipeline

# Past fp16's largest value (65504) right after the first convolutions of the encoder and the
# decoder; the GroupNorm that follows brings an fp32 pass back to scale.
HOT = 1e5


@pytest.fixture
def hot_pipe():
    """The tiny pipeline in fp16, as a GPU run holds it, with a VAE that overflows in fp16."""
    pipe = build_tiny_pipeline(0)
    with torch.no_grad():
        for conv in (pipe.vae.encoder.conv_in, pipe.vae.decoder.conv_in):
            conv.weight.mul_(HOT)
            conv.bias.mul_(HOT)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float16)


def pictures(x: torch.Tensor) -> torch.Tensor:
    return (torch.rand(x, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)


def is_a_picture(path) -> bool:
    """Not the flat black a NaN decode turns into."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).std() > 1


def test_the_vae_overflows_in_fp16_and_the_rule_runs_it_in_fp32(hot_pipe):
    vae, images = hot_pipe.vae, pictures(2)
    with torch.no_grad():
        assert not torch.isfinite(vae.encode(images.half()).latent_dist.mean).all()  # the fault, really there
        assert not torch.isfinite(vae.decode(torch.randn(2, 4, 8, 8).half()).sample).all()
    latents = autoencoder.encode(vae, images).mean
    assert torch.isfinite(latents).all() and vae.dtype == torch.float32
    assert torch.isfinite(autoencoder.decode(vae, latents)).all()


def test_class_images_from_an_fp16_model_are_pictures(hot_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(ci, "generation_device_dtype", lambda config: (torch.device("cpu"), torch.float16))
    config = Config(class_data_dir=str(tmp_path / "class"), class_prompt="girl", num_class_images=2,
                    resolution=64, class_infer_steps=1, mixed_precision="fp16")
    written = ci.generate_class_images(config, progress=False, models=SD1.models_of(hot_pipe))
    assert len(written) == 2 and all(is_a_picture(p) for p in written)


def test_previews_under_fp16_autocast_are_pictures(hot_pipe, tmp_path):
    config = Config(instance_prompt="hnzk girl", resolution=64, num_samples=1, sample_steps=1,
                    mixed_precision="fp16")
    run = SimpleNamespace(samples_dir=lambda step: tmp_path / f"step-{step}")
    grid = write_previews(run, 1, SD1, SD1.models_of(hot_pipe), hot_pipe.unet, config)
    shown = sorted(grid.parent.glob("p0-s*.png"))
    assert len(shown) == 1 and is_a_picture(shown[0])


def test_the_latent_cache_and_live_batches_are_finite(hot_pipe, tmp_path):
    instance, _ = write_dataset(tmp_path / "data", n_instance=2)
    config = Config(instance_data_dir=str(instance), instance_prompt="hnzk girl", resolution=64,
                    with_prior_preservation=False)
    batches = read_images(config, hot_pipe.tokenizer)
    live = latent_batch(batches, "instance", [0, 1], torch.tensor([False, True]), hot_pipe.vae)
    batches.latents = cache_latents(batches, hot_pipe.vae, hflip=True)
    cached = latent_batch(batches, "instance", [0, 1], torch.tensor([False, True]), hot_pipe.vae)
    for mean, std in (live, cached):
        assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    torch.testing.assert_close(live, cached)
