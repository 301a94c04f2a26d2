"""dbnb.family.sd1.layout: diffusers → original single-file layout, checked with diffusers' own importer."""
from __future__ import annotations

import re
import socket

import pytest
import torch

from dbnb.family.sd1 import layout
from dbnb.family.sd1.layout import (ORIGINAL_PREFIXES, original_state_dict, text_encoder_key_map, unet_key_map,
                                    vae_key_map, write_single_file)
from dbnb.world.tiny import build_tiny_pipeline, make_tiny_model

COMPONENTS = ("unet", "vae", "text_encoder")
# Exported with a different seed from the config folder's weights, so a passing round trip
# proves the weights came from the single file.
EXPORT_SEED = 1


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(EXPORT_SEED)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """The tiny model's own diffusers folder: from_single_file needs its widths, not SD 1.5's."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def original(pipe):
    return original_state_dict(*(getattr(pipe, name).state_dict() for name in COMPONENTS))


def refuse_network(*args, **kwargs):
    raise AssertionError("from_single_file tried to reach the network")


def assert_same_weights(expected_pipe, loaded_pipe):
    for name in COMPONENTS:
        expected = getattr(expected_pipe, name).state_dict()
        loaded = getattr(loaded_pipe, name).state_dict()
        assert set(loaded) == set(expected), name
        different = [key for key in expected if not torch.equal(expected[key], loaded[key])]
        assert not different, f"{name}: {different[:5]}"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_through_diffusers_from_single_file(suffix, pipe, original, tiny_config,
                                                        tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; refusing sockets makes any network
    # attempt fail loudly whatever was imported first.
    monkeypatch.setattr(socket.socket, "connect", refuse_network)
    path = write_single_file(tmp_path / f"m{suffix}", original, metadata={"dbnb_model": "tiny"})
    assert path == tmp_path / f"m{suffix}" and path.is_file()
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tiny_config), local_files_only=True, safety_checker=None)
    assert_same_weights(pipe, loaded)


def test_ckpt_is_a_plain_weights_only_pickle(original, tmp_path):
    path = write_single_file(tmp_path / "m.ckpt", original, metadata={"dbnb_model": "tiny"})
    loaded = torch.load(path, weights_only=True)
    assert loaded["dbnb_model"] == "tiny"
    assert loaded["state_dict"].keys() == original.keys()


# AUTOMATIC1111's webui (modules/safe.py) opens a .ckpt only if every record name matches this
# and its pickle asks for these globals only; otherwise "The file may be malicious".
WEBUI_RECORD_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
WEBUI_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
WEBUI_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                 ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                 *(("torch", f"{kind}Storage") for kind in ("Float", "Half", "Int", "Long", "Double", "Byte",
                                                            "BFloat16")),
                 ("torch", "float32"), ("numpy", "dtype"), ("numpy", "ndarray"), ("_codecs", "encode"),
                 ("__builtin__", "set")}


def webui_refusal(path) -> str | None:
    """What the webui's check of a .ckpt says against it (None: it loads the file)."""
    import pickle
    import zipfile

    class Restricted(pickle.Unpickler):
        def persistent_load(self, saved_id):
            assert saved_id[0] == "storage"
            return torch.storage.TypedStorage(_internal=True)

        def find_class(self, module, name):
            if (module, name) not in WEBUI_GLOBALS:
                raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
            return super().find_class(module, name)

    with zipfile.ZipFile(path) as z:
        bad = [name for name in z.namelist() if not WEBUI_RECORD_NAMES.match(name)]
        if bad:
            return f"bad file inside {path}: {bad[0]}"
        pickles = [name for name in z.namelist() if WEBUI_DATA_PKL.match(name)]
        if not pickles:
            return f"data.pkl not found in {path}"
        try:
            with z.open(pickles[0]) as f:
                Restricted(f).load()
        except pickle.UnpicklingError as e:
            return str(e)
    return None


def test_the_webui_check_refuses_what_plain_torch_save_writes(tmp_path):
    # The check above is the webui's: it refuses the records recent torch adds.
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "plain.ckpt")
    refusal = webui_refusal(tmp_path / "plain.ckpt")
    if refusal is None:
        pytest.skip(f"torch {torch.__version__}'s own .ckpt holds only records the webui accepts")
    assert "bad file inside" in refusal and ("format_version" in refusal or "storage_alignment" in refusal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ckpt_opens_in_the_webui_and_memory_mapped_in_comfyui(original, tmp_path, dtype):
    import zipfile

    # the file's own name (not its temporary one) as the archive's folder, as torch.save gives it
    path = write_single_file(tmp_path / "ユキ v2.ckpt", {k: v.to(dtype) for k, v in original.items()},
                             metadata={"dbnb_model": "tiny"}, global_step=7)
    assert webui_refusal(path) is None
    with zipfile.ZipFile(path) as z:
        assert {name.split("/")[0] for name in z.namelist()} == {"ユキ v2"}
        # stored, each record's bytes on a 64-byte boundary: what a memory-mapped load views
        assert all(info.compress_type == zipfile.ZIP_STORED for info in z.infolist())
        with open(path, "rb") as f:
            for info in z.infolist():
                f.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    for mmap in (False, True):
        loaded = torch.load(path, weights_only=True, mmap=mmap)
        assert loaded["dbnb_model"] == "tiny" and loaded["global_step"] == 7
        assert loaded["state_dict"].keys() == original.keys()
        different = [k for k, v in original.items() if not torch.equal(loaded["state_dict"][k], v.to(dtype))]
        assert not different, (mmap, different[:3])


def test_safetensors_metadata(original, tmp_path):
    from safetensors import safe_open

    path = write_single_file(tmp_path / "m.safetensors", original, metadata={"seed": "1"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"seed": "1"}
        assert set(f.keys()) == set(original)


def test_make_tiny_model_single_file(tmp_path):
    make_tiny_model(tmp_path / "tiny", single_file=tmp_path / "tiny.safetensors")
    assert (tmp_path / "tiny.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# key names


def test_every_key_has_an_original_prefix_and_nothing_is_dropped(pipe, original):
    prefixes = tuple(ORIGINAL_PREFIXES.values())
    assert all(key.startswith(prefixes) for key in original)
    for name in COMPONENTS:
        source = getattr(pipe, name).state_dict()
        exported = [k for k in original if k.startswith(ORIGINAL_PREFIXES[name])]
        assert len(exported) == len(source), name


@pytest.mark.parametrize("key, shape", [
    ("model.diffusion_model.input_blocks.0.0.weight", (32, 4, 3, 3)),
    ("model.diffusion_model.input_blocks.1.1.proj_in.weight", None),
    ("model.diffusion_model.input_blocks.3.0.op.weight", None),
    ("model.diffusion_model.input_blocks.7.0.skip_connection.weight", None),
    ("model.diffusion_model.input_blocks.11.0.emb_layers.1.weight", None),
    ("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight", None),
    ("model.diffusion_model.middle_block.2.out_layers.3.weight", None),
    ("model.diffusion_model.output_blocks.2.1.conv.weight", None),   # up block 0: no attention
    ("model.diffusion_model.output_blocks.5.2.conv.weight", None),   # after an attention
    ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", None),
    ("model.diffusion_model.time_embed.0.weight", None),
    ("model.diffusion_model.time_embed.2.weight", None),
    ("model.diffusion_model.out.0.weight", None),
    ("model.diffusion_model.out.2.weight", (4, 32, 3, 3)),
    ("first_stage_model.encoder.mid.attn_1.q.weight", (32, 32, 1, 1)),
    ("first_stage_model.decoder.mid.attn_1.proj_out.weight", (32, 32, 1, 1)),
    ("first_stage_model.decoder.mid.attn_1.norm.weight", (32,)),
    ("first_stage_model.encoder.down.3.block.1.conv2.weight", None),
    ("first_stage_model.encoder.norm_out.weight", None),
    ("first_stage_model.decoder.up.3.block.0.conv1.weight", None),
    ("first_stage_model.decoder.up.1.upsample.conv.weight", None),
    ("first_stage_model.quant_conv.weight", (8, 8, 1, 1)),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", (32,)),
    ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", (77, 32)),
    ("cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight", (32, 64)),
])
def test_known_original_names(original, key, shape):
    assert key in original
    if shape is not None:
        assert tuple(original[key].shape) == shape


def test_absent_original_names(original):
    # Up block 0 has no attention, so its upsampler is .1 and nothing sits at .2.
    assert not any(k.startswith("model.diffusion_model.output_blocks.2.2.") for k in original)
    assert not any(k.startswith("first_stage_model.decoder.up.0.upsample") for k in original)
    assert not any(k.startswith("first_stage_model.encoder.down.3.downsample") for k in original)
    assert not any("position_ids" in k for k in original)


def test_vae_nin_shortcut_where_widths_change():
    # The tiny VAE has one width throughout; a widening one has conv shortcuts, which the
    # original layout calls nin_shortcut, in the (reversed) decoder numbering.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=[32, 64, 64, 64], latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2)
    mapped = vae_key_map(vae.state_dict())
    assert mapped["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == \
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"
    assert mapped["decoder.up_blocks.3.resnets.0.conv_shortcut.bias"] == \
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.bias"


def test_tensors_are_passed_through_not_copied(pipe, original):
    unet = pipe.unet.state_dict()
    assert original["model.diffusion_model.out.2.weight"].data_ptr() == \
        unet["conv_out.weight"].data_ptr()
    vae = pipe.vae.state_dict()
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].data_ptr() == \
        vae["encoder.mid_block.attentions.0.to_q.weight"].data_ptr()


def test_components_can_be_left_out(pipe):
    unet_only = original_state_dict(pipe.unet.state_dict(), None, None)
    assert unet_only and all(k.startswith(ORIGINAL_PREFIXES["unet"]) for k in unet_only)
    # Any iterable of keys will do: a state dict, its keys, a list.
    state = pipe.unet.state_dict()
    assert unet_key_map(state) == unet_key_map(list(state)) == unet_key_map(state.keys())


# ---------------------------------------------------------------------------------------------
# strictness and text encoder key styles


@pytest.mark.parametrize("component, key", [
    ("unet", "down_blocks.0.resnets.0.bogus.weight"),
    ("unet", "conv_in.running_mean"),
    ("unet", "_orig_mod.conv_in.weight"),
    ("vae", "encoder.mid_block.attentions.0.query.weight"),
    ("text_encoder", "text_projection.weight"),
])
def test_unknown_key_raises_naming_it(pipe, component, key):
    states = {name: dict(getattr(pipe, name).state_dict()) for name in COMPONENTS}
    states[component][key] = torch.zeros(1)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        original_state_dict(*(states[name] for name in COMPONENTS))


def test_block_index_gap_raises(pipe):
    state = dict(pipe.unet.state_dict())
    state["down_blocks.7.resnets.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="down_blocks"):
        unet_key_map(state)


def bare_text_state(pipe) -> dict:
    """The text encoder's weights as transformers 5 names them: transformers 4 prefixes every
    key with `text_model.`, 5 does not; the declared range has both."""
    return {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()
            if not k.endswith("position_ids")}


def test_old_text_model_prefixed_keys_map_the_same(pipe):
    bare = bare_text_state(pipe)
    prefixed = {f"text_model.{k}": v for k, v in bare.items()}
    prefixed["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers 4
    new_map, old_map = text_encoder_key_map(bare), text_encoder_key_map(prefixed)
    assert sorted(new_map.values()) == sorted(old_map.values())
    assert old_map["text_model.final_layer_norm.weight"] == \
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    assert "text_model.embeddings.position_ids" not in old_map


def test_same_text_weight_twice_raises(pipe):
    bare = bare_text_state(pipe)
    bare["text_model.final_layer_norm.weight"] = bare["final_layer_norm.weight"]
    with pytest.raises(ValueError, match="final_layer_norm"):
        text_encoder_key_map(bare)


# ---------------------------------------------------------------------------------------------
# writer


@pytest.mark.parametrize("name", ["m.bin", "m.pt", "m", "m.safetensors.part"])
def test_bad_suffix_raises_naming_path_and_allowed(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.safetensors.*\.ckpt") as info:
        write_single_file(tmp_path / name, {"a": torch.zeros(1)})
    assert name in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_non_string_metadata_raises(tmp_path):
    with pytest.raises(TypeError):
        write_single_file(tmp_path / "m.safetensors", {"a": torch.zeros(1)}, metadata={"n": 1})


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_atomic_write_leaves_only_the_final_file(tmp_path, suffix):
    sd = {"a": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous on purpose
    path = write_single_file(tmp_path / "sub" / f"m{suffix}", sd)
    assert list(path.parent.iterdir()) == [path]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_written_file_has_ordinary_permissions(tmp_path, suffix):
    # safetensors alone would leave the file owner-only (0600).
    (tmp_path / "plain").touch()
    path = write_single_file(tmp_path / f"m{suffix}", {"a": torch.zeros(1)})
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_failed_save_leaves_neither_temp_nor_final_file(tmp_path, monkeypatch, suffix):
    import safetensors.torch

    def explode(*args, **kwargs):
        # Leave a partial file behind, as a real crash mid-write would.
        target = args[1]
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    def explode_in_archive(obj, archive, *args):
        archive.write_record("data.pkl", b"partial", 7)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    monkeypatch.setattr(layout.torch.serialization, "_save", explode_in_archive)
    with pytest.raises(OSError, match="disk full"):
        write_single_file(tmp_path / f"m{suffix}", {"a": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = write_single_file(tmp_path / "m.safetensors", {"a": torch.zeros(1)})
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        write_single_file(path, {"a": torch.ones(1)})
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
