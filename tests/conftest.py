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
