"""Shared fixtures. Nothing here touches the network: models are the tiny SD 1.x model."""
import os

import pytest

# Belt and braces: a test that would reach the Hub fails instead of hanging or downloading.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model as a diffusers folder (written once per test session)."""
    from dbnb.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """dbnb's download / skeleton cache goes to the test's own folder."""
    monkeypatch.setenv("DBNB_CACHE", str(tmp_path / "dbnb-cache"))


@pytest.fixture(scope="session")
def embedders(tmp_path_factory):
    """Folders holding a tiny CLIP (+ the real CLIP BPE tokenizer) and a tiny DINO-style ViT."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from dbnb.tiny import SKELETON

    root = tmp_path_factory.mktemp("embedders")
    layers = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **layers),
                         vision_config=dict(image_size=32, patch_size=8, **layers),
                         projection_dim=16)).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(SKELETON / "tokenizer").save_pretrained(root / "clip")
    ViTModel(ViTConfig(image_size=32, patch_size=8, **layers), add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"
