"""SDXL's single file (issue 33, items 1, 2 and 4): the original (sgm) layout checked against
diffusers' own reference conversion at full size and at tiny size, exports of a model and of a
trained run read back with from_single_file, `dbnb convert` back to a folder, which family a folder,
a file and a Hub id are, and the v-prediction / zero-terminal-SNR markers going round."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from dbnb.family import base
from dbnb.family.sd1.singlefile import keys_and_shapes
from dbnb.family.sdxl import layout
from dbnb.family.sdxl.family import SDXL
from dbnb.family.sdxl.skeleton import SKELETON, sdxl_variant, skeleton_config, skeleton_folder

# SDXL 1.0 base's single file (sd_xl_base_1.0.safetensors) holds 2515 tensors: these per part.
REFERENCE_COUNTS = {layout.UNET: 1680, layout.VAE: 248, layout.CLIP_L: 197, layout.BIGG: 390}


def _parts(unet, vae, te1, te2) -> tuple[dict, dict, dict]:
    """(denoiser, autoencoder, encoder) state dicts as the export hands them to the layout."""
    encoder = torch.nn.ModuleDict({"te1": te1, "te2": te2})
    return unet.state_dict(), vae.state_dict(), encoder.state_dict()


def _reference_conversion(original: dict, unet, vae, te1, te2) -> dict[str, dict]:
    """The file's state dict read back by diffusers' own single-file converters, part by part."""
    from diffusers.loaders import single_file_utils as reference

    return {"unet": reference.convert_ldm_unet_checkpoint(original, dict(unet.config)),
            "vae": reference.convert_ldm_vae_checkpoint(original, dict(vae.config)),
            "te1": reference.convert_ldm_clip_checkpoint(original),
            "te2": reference.convert_open_clip_checkpoint(te2, original, prefix=layout.BIGG)}


def _assert_reference_reads_every_tensor(original: dict, models: dict[str, torch.nn.Module]) -> None:
    """Each part comes back from the reference conversion with exactly its diffusers keys and shapes,
    and as many numbers as the file holds for it: nothing missing, nothing left over."""
    converted = _reference_conversion(original, *models.values())
    prefixes = dict(zip(models, (layout.UNET, layout.VAE, layout.CLIP_L, layout.BIGG)))
    for name, model in models.items():
        own, got = ({k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
                    for state in (model.state_dict(), converted[name]))
        assert got.keys() == own.keys(), (name, sorted(got.keys() ^ own.keys())[:4])
        assert all(tuple(got[k].squeeze().shape) == tuple(own[k].squeeze().shape) for k in own), name
        written = sum(v.numel() for k, v in original.items() if k.startswith(prefixes[name])
                      and k not in (layout.POSITION_IDS, layout.LOGIT_SCALE))
        assert written == sum(v.numel() for v in own.values()), name


def test_full_size_sdxl_has_the_reference_files_keys_and_diffusers_reads_them_all():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):  # SDXL 1.0's shapes from the shipped skeleton, no weights
        models = {"unet": UNet2DConditionModel.from_config(skeleton_config("unet")),
                  "vae": AutoencoderKL.from_config(skeleton_config("vae")),
                  "te1": CLIPTextModel(CLIPTextConfig(**skeleton_config("text_encoder"))),
                  "te2": CLIPTextModelWithProjection(CLIPTextConfig(**skeleton_config("text_encoder_2")))}
    parts = _parts(*models.values())
    original = layout.original_state_dict(*parts, ("epsilon", False))
    assert set(original) == layout.original_keys(*parts, ("epsilon", False))
    assert {p: sum(k.startswith(p) for k in original) for p in REFERENCE_COUNTS} == REFERENCE_COUNTS
    assert len(original) == sum(REFERENCE_COUNTS.values()) == 2515
    assert original[layout.BIGG + "text_projection"].shape == (1280, 1280)
    assert original[layout.BIGG + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    _assert_reference_reads_every_tensor(original, models)
    # such a file loads with the shipped skeleton itself, offline
    assert skeleton_folder(sdxl_variant({k: tuple(v.shape) for k, v in original.items()}, "sdxl.safetensors")) \
        == SKELETON


def test_tiny_export_reads_back_through_diffusers_and_converts_back_to_a_folder(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from dbnb.faces.cli import main
    from dbnb.ship.export import export

    result = export(str(tiny_sdxl), to=str(tmp_path), precision="fp32")  # verified inside: keys, weights
    assert result.verified and base.for_model(str(result.path)) is SDXL
    keys, _ = keys_and_shapes(result.path)
    source = SDXL.open(str(tiny_sdxl))
    models = {"unet": source.denoiser, "vae": source.autoencoder, **source.encoder}
    assert set(keys) == layout.original_keys(*_parts(*models.values()), ("epsilon", False))
    assert not {layout.V_PRED, layout.ZTSNR} & set(keys)  # an epsilon base is marked as nothing else
    from safetensors.torch import load_file

    _assert_reference_reads_every_tensor(load_file(result.path), models)

    # the same pictures' noise prediction from the file as from the folder
    read = SDXL.open(str(result.path))
    latents, steps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    inputs = {name: tokenizer(["hnzk girl"], padding="max_length", max_length=77, return_tensors="pt").input_ids
              for name, tokenizer in read.tokenizers.items()}
    with torch.no_grad():
        theirs, ours = (SDXL.predict(m.denoiser, latents, steps, SDXL.encode_prompts(m.encoder, inputs))
                        for m in (source, read))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    folder = tmp_path / "back"
    assert main(["convert", str(result.path), str(folder)]) == 0
    assert base.for_model(str(folder)) is SDXL
    back = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert all(torch.equal(v, back.unet.state_dict()[k]) for k, v in source.denoiser.state_dict().items())
    assert back.tokenizer_2.pad_token == "!"  # OpenCLIP's padding, as the skeleton's second tokenizer has it


def test_a_trained_full_sdxl_run_exports_with_dbnb_export(make_config, tiny_sdxl, tmp_path):
    from dbnb.faces.cli import main
    from dbnb.run.checkpoints import RunFolder
    from dbnb.train.loop import train

    run = train(make_config(pretrained_model_name_or_path=str(tiny_sdxl), max_train_steps=1, save_every_steps=1,
                            learning_rate=1e-3), progress=False)
    assert main(["export", str(run.run_dir), "--to", str(tmp_path / "out"), "--precision", "fp32"]) == 0
    [exported] = sorted((tmp_path / "out").glob("*.safetensors"))
    trained = RunFolder(run.run_dir).pick(None).denoiser_state(False, torch.float32)
    read = SDXL.open(str(exported))
    assert all(torch.equal(read.denoiser.state_dict()[k], v) for k, v in trained.items())
    base_unet = SDXL.open(str(tiny_sdxl)).denoiser.state_dict()
    assert any(not torch.equal(base_unet[k], v) for k, v in trained.items())  # the run's weights, not the base's


def test_an_export_the_loader_reads_back_differently_is_refused_and_removed(tiny_sdxl, tmp_path, monkeypatch):
    from dbnb.ship.export import ExportError, export

    real = SDXL.single_file.read_back

    def misread(*args):
        models = real(*args)
        with torch.no_grad():
            models.denoiser.conv_in.bias.add_(1)
        return models
    monkeypatch.setattr(SDXL.single_file, "read_back", misread)
    with pytest.raises(ExportError, match=r"model.diffusion_model.input_blocks.0.0.bias read back different"):
        export(str(tiny_sdxl), to=str(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def _with_scheduler(folder: Path, to: Path, **settings) -> Path:
    shutil.copytree(folder, to)
    path = to / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return to


@pytest.mark.parametrize("zero_snr, fmt", [(True, "safetensors"), (False, "ckpt")])
def test_v_prediction_markers_go_round_from_folder_to_file_to_folder(tiny_sdxl, tmp_path, zero_snr, fmt):
    from dbnb.family.sdxl.load import sampling_of
    from dbnb.ship.export import convert, export

    vpred = _with_scheduler(tiny_sdxl, tmp_path / "vpred", prediction_type="v_prediction",
                            rescale_betas_zero_snr=zero_snr)
    exported = export(str(vpred), to=str(tmp_path / "out"), fmt=fmt).path
    keys, shapes = keys_and_shapes(exported)
    assert {layout.V_PRED, layout.ZTSNR} & set(keys) == ({layout.V_PRED, layout.ZTSNR} if zero_snr else {layout.V_PRED})
    assert shapes[layout.V_PRED] == (0,)  # an empty marker, as NoobAI-XL v-pred's
    scheduler = SDXL.open(str(exported)).pipe.scheduler.config
    assert (scheduler.prediction_type, scheduler.rescale_betas_zero_snr) == ("v_prediction", zero_snr)
    back = convert(exported, tmp_path / "back")
    assert sampling_of(str(back)) == ("v_prediction", zero_snr)


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face cache holding `folder` as `repo_id`'s main revision, as a download leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_family_is_detected_from_a_folder_a_file_and_a_hub_id_offline(tiny_sdxl, tiny_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dbnb.ship.export import export

    cache = tmp_path / "hub"
    _hub_cache(cache, "org/tiny-xl", tiny_sdxl)
    _hub_cache(cache, "org/tiny-sd", tiny_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # conftest sets it: never the network

    single = export(str(tiny_sdxl), to=str(tmp_path / "out")).path
    assert [base.for_model(s) for s in (str(tiny_sdxl), str(single), "org/tiny-xl")] == [SDXL] * 3
    assert base.for_model("org/tiny-sd") is not SDXL and base.for_model("org/not-cached") is not SDXL
    hub = SDXL.open("org/tiny-xl")
    assert all(torch.equal(v, hub.denoiser.state_dict()[k])
               for k, v in SDXL.open(str(tiny_sdxl)).denoiser.state_dict().items())


def test_notebook_01s_download_of_an_sdxl_hub_id_is_a_folder_with_both_text_encoders(tiny_sdxl, tmp_path,
                                                                                      monkeypatch):
    """Notebook 01 brings the base model into the workspace (models/hub) once: an SDXL repo arrives
    as the pipeline's parts (both encoders and tokenizers), which later notebooks read as SDXL."""
    from huggingface_hub import constants

    from dbnb.family.source import fetch_model

    _hub_cache(tmp_path / "models" / "hub", "org/tiny-xl", tiny_sdxl)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = Path(fetch_model("org/tiny-xl", tmp_path / "models"))
    assert folder.is_relative_to(tmp_path / "models")
    assert {"text_encoder_2", "tokenizer_2", "unet", "vae"} <= {p.name for p in folder.iterdir()}
    assert base.for_model(str(folder)) is SDXL


def test_a_hub_repo_of_one_single_file_is_fetched_and_read_as_sdxl(tiny_sdxl, tmp_path, monkeypatch):
    """Illustrious-XL 0.1 on the Hub is single files, no model_index.json: a repo holding one is
    fetched (notebook 01, into the workspace) and recognized from its keys; one holding several
    is an error that names each file's URL to set instead."""
    from huggingface_hub import constants

    from dbnb.core.source_names import hub_repo, public_name
    from dbnb.family.source import ModelLoadError, fetch_model, resolve_source
    from dbnb.ship.export import export

    single = export(str(tiny_sdxl), to=str(tmp_path / "out")).path
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(single, repo / "tiny-xl-v0.1.safetensors")
    (repo / "README.md").write_text("a model card")
    cache = tmp_path / "models" / "hub"
    _hub_cache(cache, "org/tiny-xl-file", repo)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    fetched = Path(fetch_model("org/tiny-xl-file", tmp_path / "models"))
    assert fetched.name == "tiny-xl-v0.1.safetensors" and fetched.is_relative_to(cache)
    assert base.for_model(str(fetched)) is SDXL and base.for_model("org/tiny-xl-file") is SDXL
    opened = SDXL.open("org/tiny-xl-file").denoiser.state_dict()
    assert all(torch.equal(v, opened[k]) for k, v in SDXL.open(str(single)).denoiser.state_dict().items())

    # the same file by its URL, as the base-model field offers Illustrious: the Hub's own download and
    # cache, whose folder names the repo for the model card
    url = "https://huggingface.co/org/tiny-xl-file/resolve/main/tiny-xl-v0.1.safetensors"
    assert Path(fetch_model(url, tmp_path / "models")) == fetched and base.for_model(url) is SDXL
    assert hub_repo(str(fetched)) == "org/tiny-xl-file" and public_name(str(fetched)) == fetched.name

    # a VAE repo (sdxl-vae-fp16-fix: config.json, its diffusers weights and a single file beside them) is a
    # diffusers part, for diffusers to load, not a repo of single files
    vae = shutil.copytree(tiny_sdxl / "vae", tmp_path / "vae-repo")
    shutil.copy(vae / "diffusion_pytorch_model.safetensors", vae / "tiny_vae.safetensors")
    _hub_cache(cache, "org/tiny-xl-vae", vae)
    assert resolve_source("org/tiny-xl-vae", setting="pretrained_vae_name_or_path") == ("hub", "org/tiny-xl-vae")

    shutil.copy(single, repo / "tiny-xl-v0.1-GUIDED.safetensors")
    _hub_cache(cache, "org/two-files", repo)
    with pytest.raises(ModelLoadError) as said:
        fetch_model("org/two-files", tmp_path / "models")
    for name in ("tiny-xl-v0.1.safetensors", "tiny-xl-v0.1-GUIDED.safetensors"):
        assert f"https://huggingface.co/org/two-files/resolve/main/{name}" in str(said.value)
    assert "pretrained_model_name_or_path" in str(said.value)


def test_an_sdxl_file_at_a_url_is_recognized_and_downloaded_once(tiny_sdxl, tmp_path, http_server):
    """A URL pasted from Civitai or the Hub: downloaded when its family is asked (only its keys
    tell it), then loaded from the same download."""
    from dbnb.family.sdxl.load import sampling_of
    from dbnb.ship.export import export

    single = export(str(tiny_sdxl), to=str(tmp_path / "out")).path
    http_server.routes["/files/tiny-xl.safetensors"] = (single.read_bytes(), {})
    url = http_server.url + "/files/tiny-xl.safetensors"
    assert base.for_model(url) is SDXL and sampling_of(url) == layout.EPSILON
    opened = SDXL.open(url).denoiser.state_dict()
    assert all(torch.equal(v, opened[k]) for k, v in SDXL.open(str(single)).denoiser.state_dict().items())
    assert http_server.hits == {"/files/tiny-xl.safetensors": 1}
