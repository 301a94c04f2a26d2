import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dbnb.core.source_names import public_name
from dbnb.family.sd1.load import UnsafeCheckpointError, load_checkpoint_file, load_pipeline, sd1_variant
from dbnb.family.source import ModelLoadError, resolve_source
from dbnb.world.tiny import build_tiny_pipeline


def assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
        sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


@pytest.fixture(scope="module")
def reference():
    return build_tiny_pipeline(seed=0)


def test_diffusers_folder(tiny_dir, reference):
    pipe = load_pipeline(str(tiny_dir))
    assert_same_weights(pipe, reference)
    assert pipe.tokenizer("a photo of sks girl").input_ids == [49406, 320, 1125, 539, 48136, 1611, 49407]
    assert pipe.safety_checker is None


def test_hub_id_resolved_offline_from_a_local_cache(tiny_dir, tmp_path):
    # Lay the tiny model out exactly as huggingface_hub caches a download of "dbnb-test/tiny-sd".
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--dbnb-test--tiny-sd"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent("""
        from dbnb.family.sd1.load import load_pipeline
        from dbnb.family.source import resolve_source
        assert resolve_source("dbnb-test/tiny-sd") == ("hub", "dbnb-test/tiny-sd")
        pipe = load_pipeline("dbnb-test/tiny-sd")
        print("loaded", pipe.unet.config.block_out_channels)
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded [32, 32, 64, 64]" in done.stdout


def test_unknown_sources_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing folder"):
        resolve_source("nope")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="unknown model file type"):
        resolve_source(str(tmp_path / "m.txt"))
    with pytest.raises(ModelLoadError, match="pretrained_model_name_or_path"):
        resolve_source("")


@pytest.mark.parametrize("source", ["models/my.safetensors", "my.ckpt", "./models/sd15", "../sd15",
                                    "drive/MyDrive/sd15", "~/models/my-model", "models\\my.safetensors"])
def test_a_missing_path_is_named_as_a_path_not_asked_of_the_hub(source, tmp_path, monkeypatch):
    """'models/my.safetensors' fits a repo id's pattern; the Hub's answer ("not fully cached")
    hid that the file is not there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelLoadError) as caught:
        load_pipeline(source)
    message = str(caught.value)
    assert f"Base model {source!r} does not exist" in message and "cached" not in message
    assert str(Path(source).expanduser().absolute()) in message and "pretrained_model_name_or_path" in message


def test_a_missing_model_file_through_the_cli_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from dbnb.faces.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["convert", "models/my.safetensors", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dbnb: Base model 'models/my.safetensors' does not exist")
    assert str(tmp_path / "models" / "my.safetensors") in err and "Traceback" not in err


@pytest.mark.parametrize("vae", ["vae/missing.safetensors", "nothere"])
def test_a_missing_vae_is_called_the_vae_and_its_setting_named(vae, tiny_dir, tmp_path, monkeypatch):
    from dbnb.family.sd1.load import load_vae

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_vae(vae)
    message = str(caught.value)
    assert message.startswith(f"VAE {vae!r}") and "pretrained_vae_name_or_path" in message
    assert "Base model" not in message and "pretrained_model_name_or_path" not in message


def test_a_model_folder_with_a_part_missing_is_named_before_anything_loads(tiny_dir, tmp_path, capsys):
    from dbnb.core.config import Config
    from dbnb.faces.cli import main
    from dbnb.world.demo import write_dataset

    instance, _ = write_dataset(tmp_path / "data", n_instance=2)
    for gone, said in (("tokenizer", "tokenizer/ is missing"), ("unet", "unet/ is missing"),
                       ("tokenizer/merges.txt", r"tokenizer/vocab.json \+ tokenizer/merges.txt or "
                                                r"tokenizer/tokenizer.json is missing")):
        model = tmp_path / gone.replace("/", "-") / "model"
        shutil.copytree(tiny_dir, model)
        shutil.rmtree(model / gone) if (model / gone).is_dir() else (model / gone).unlink()
        (model / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        config = Config(pretrained_model_name_or_path=str(model), instance_data_dir=str(instance),
                        instance_prompt="hnzk girl", output_dir=str(tmp_path / "runs"), run_name=gone[:4],
                        resolution=64, max_train_steps=1, lr_warmup_steps=0, mixed_precision="no")
        assert main(["train", str(config.save(tmp_path / "c.yaml")), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.search(f"{model} is not a whole diffusers model folder: {said}. Copy the whole model", err), err
        assert "Traceback" not in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


@pytest.mark.parametrize("source, name", [
    ("runwayml/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
    ("/content/drive/MyDrive/models/anything-v5.safetensors", "anything-v5.safetensors"),
    ("/content/drive/MyDrive/models/anything-v5/", "anything-v5"),
    ("~/models/m.ckpt", "m.ckpt"),
    (r"C:\Users\me\models\m.ckpt", "m.ckpt"),
    ("https://civitai.com/api/download/models/1?token=secret#x", "https://civitai.com/api/download/models/1"),
    ("https://me:pw@example.com:8080/m.safetensors", "https://example.com:8080/m.safetensors"),
    ("https://drive.google.com/file/d/1AbCdEfGhIjKlMnOpQrStUv/view?usp=sharing", "drive-1AbCdEfGhI"),
    # where notebook 01 leaves a Hub model: its folder is named by a commit, so the repo names it
    ("/content/drive/MyDrive/dbnb/models/hub/models--Laxhar--noobai-XL-1.1/snapshots/" + "a1" * 20,
     "Laxhar/noobai-XL-1.1"),
])
def test_public_name_keeps_hub_ids_and_drops_local_paths_and_secrets(source, name):
    assert public_name(source) == name


def test_public_name_of_a_local_folder_that_looks_like_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert public_name("models/mine") == "mine"


def test_ckpt_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    flag = tmp_path / "pwned"
    payload = _RunsCode()
    payload.flag = flag
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3)},
                "callback": payload}, tmp_path / "evil.ckpt")
    assert not flag.exists()
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        load_checkpoint_file(tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError):
        load_pipeline(str(tmp_path / "evil.ckpt"))
    assert not flag.exists()


def test_sd2_and_sdxl_keys_are_not_supported_yet():
    with pytest.raises(ModelLoadError, match="SD 2"):
        sd1_variant(["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], {})
    with pytest.raises(ModelLoadError, match="SDXL"):
        sd1_variant(["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"], {})
    with pytest.raises(ModelLoadError, match="No UNet"):
        sd1_variant(["encoder.conv_in.weight"], {})
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert sd1_variant([key], {key: (320, 4, 3, 3)}) == "sd15"
    assert sd1_variant([key], {key: (32, 4, 3, 3)}) == "tiny"
    level1 = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
    assert sd1_variant([key, level1], {key: (32, 4, 3, 3), level1: (64, 32, 3, 3)}) == "world"


def test_single_safetensors_file_loads_offline(tmp_path, reference, monkeypatch):
    from dbnb.world.tiny import make_tiny_model

    make_tiny_model(tmp_path / "folder", single_file=tmp_path / "tiny.safetensors", seed=0)
    pipe = load_pipeline(str(tmp_path / "tiny.safetensors"))
    assert_same_weights(pipe, reference)


def test_ckpt_written_with_torch_save_loads(tmp_path, reference):
    from dbnb.family.sd1.layout import original_state_dict

    state = original_state_dict(reference.unet.state_dict(), reference.vae.state_dict(),
                                reference.text_encoder.state_dict())
    torch.save({"state_dict": state, "global_step": 123}, tmp_path / "tiny.ckpt")
    pipe = load_pipeline(str(tmp_path / "tiny.ckpt"))
    assert_same_weights(pipe, reference)
    assert len(load_checkpoint_file(tmp_path / "tiny.ckpt")) == len(state)


def _vae_only(vae, prefix=""):
    """A VAE alone in the original layout, as VAE files are shared (optionally with the
    first_stage_model. prefix a whole checkpoint gives it)."""
    from dbnb.family.sd1.layout import original_state_dict

    state = original_state_dict({}, vae.state_dict())
    return {prefix + k[len("first_stage_model."):]: v for k, v in state.items()}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_separate_vae_is_the_one_used(tiny_dir, tmp_path, reference, drive):
    from safetensors.torch import save_file

    from dbnb.family.sd1.load import load_vae

    other = build_tiny_pipeline(seed=1).vae
    other.save_pretrained(tmp_path / "bare")  # a VAE folder: config.json, no model_index.json
    other.save_pretrained(tmp_path / "model" / "vae")  # a model folder's vae/
    save_file(_vae_only(other), tmp_path / "vae.safetensors")
    save_file(_vae_only(other, "first_stage_model."), tmp_path / "prefixed.safetensors")
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wanted, base = other.decode(latent).sample, reference.vae.decode(latent).sample
    assert not torch.allclose(wanted, base, atol=1e-3)
    for source in ("bare", "model", "vae.safetensors", "prefixed.safetensors"):
        pipe = load_pipeline(str(tiny_dir), vae=str(tmp_path / source))
        with torch.no_grad():
            got = pipe.vae.decode(latent).sample
        torch.testing.assert_close(got, wanted, rtol=0, atol=1e-5, msg=source)
        assert torch.equal(pipe.unet.conv_in.weight, reference.unet.conv_in.weight)  # only the VAE changed
    for shared in (drive.file("vae.safetensors", (tmp_path / "vae.safetensors").read_bytes()),
                   drive.folder("my vae", _files(tmp_path / "bare"))):
        with torch.no_grad():
            torch.testing.assert_close(load_vae(shared).decode(latent).sample, wanted, rtol=0, atol=1e-5)
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelLoadError, match="not an SD 1.x VAE file"):
        load_vae(str(tmp_path / "lora.safetensors"))


def test_fetch_model_keeps_local_sources_and_downloads_urls_once(tiny_dir, tmp_path, http_server, drive):
    from dbnb.family.source import fetch_model
    from dbnb.world.tiny import make_tiny_model

    make_tiny_model(tmp_path / "folder", single_file=tmp_path / "tiny.safetensors")
    assert fetch_model(str(tiny_dir), cache_dir=tmp_path / "c") == str(tiny_dir)
    single = str(tmp_path / "tiny.safetensors")
    assert fetch_model(single, cache_dir=tmp_path / "c") == single
    assert not (tmp_path / "c").exists()  # nothing copied

    data = (tmp_path / "tiny.safetensors").read_bytes()
    http_server.routes["/m/tiny.safetensors"] = (data, {})
    url = http_server.url + "/m/tiny.safetensors"
    got = Path(fetch_model(url, cache_dir=tmp_path / "c"))
    assert got.parent == tmp_path / "c" / "downloads" and got.name.endswith("-tiny.safetensors")
    assert got.read_bytes() == data and not list(got.parent.glob("*.part"))
    assert fetch_model(url, cache_dir=tmp_path / "c") == str(got)
    assert http_server.hits == {"/m/tiny.safetensors": 1}  # the second call reads the cache
    assert_same_weights(load_pipeline(str(got)), build_tiny_pipeline(seed=0))

    # Drive: a file (its name kept), a file Drive names without a suffix, and a model folder.
    for shared, name in ((drive.file("tiny.safetensors", data), "tiny.safetensors"),
                         (drive.file("my model", data), "my model.safetensors"),
                         (drive.folder("tiny-sd", _files(tiny_dir)), "drive-folder")):
        got = Path(fetch_model(shared, cache_dir=tmp_path / "c"))
        assert got.parent == tmp_path / "c" / "downloads"
        assert got.name.endswith(name) and fetch_model(shared, cache_dir=tmp_path / "c") == str(got)
        assert (got / "unet").is_dir() if got.is_dir() else got.read_bytes() == data
    assert_same_weights(load_pipeline(shared, cache_dir=tmp_path / "c"), build_tiny_pipeline(seed=0))
    assert set(http_server.hits.values()) == {1}  # every file and folder listing once, then the cache
    with pytest.raises(ModelLoadError, match="Cannot retrieve the public link.*anyone with the link"):
        fetch_model("https://drive.google.com/file/d/1NotSharedWithAnyoneAtAll000000/view", cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c" / "downloads").glob("*.part"))
    http_server.routes.clear()
    with pytest.raises(ModelLoadError, match="404"):
        fetch_model(http_server.url + "/gone.safetensors", cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c" / "downloads").iterdir() if "gone" in p.name]


def test_the_base_fingerprint_reads_tensors_past_float32s_exact_integers():
    """CLIP-L's token embedding (49408 x 768) has more values than float32 counts exactly: the last
    pick must stay inside it (it rounded to one past the end and stopped every full-size run)."""
    from types import SimpleNamespace

    from dbnb.family.sd1.load import fingerprint

    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.zeros(16777220, 1, dtype=torch.float16))  # 2**24 + 4 values
    assert len(fingerprint(SimpleNamespace(unet=big), ("unet",))["unet"]) == 16
