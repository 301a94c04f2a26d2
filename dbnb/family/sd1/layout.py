"""diffusers → original (LDM / AUTOMATIC1111 webui) single-file layout for Stable Diffusion 1.x.

diffusers can *read* an original-layout checkpoint (`from_single_file`) but ships no writer, so
this module owns the export side. The key maps are derived from the block structure found in the
state dict itself (how many down blocks, resnets per block, transformer depth, …), not from fixed
SD 1.5 widths or regex tables, so the tiny test model and the real SD 1.5 go through the same code.

The original layout keeps everything in one flat dict:

    model.diffusion_model.*                     UNet           (ldm openaimodel.UNetModel)
    first_stage_model.*                         VAE            (ldm AutoencoderKL)
    cond_stage_model.transformer.text_model.*   text encoder   (transformers CLIPTextModel)

Mapping is strict: a key with no known counterpart raises ValueError instead of being dropped,
because a silently missing tensor only shows up later as a broken model in someone's webui.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import torch

from dbnb.core.weightfile import save_safetensors, write_atomically
from dbnb.family.base import FileParts

ORIGINAL_PREFIXES: Mapping[str, str] = MappingProxyType({
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
})
TEXT_ENCODER_OLD = "cond_stage_model.transformer."  # before transformers' text_model: level (old ldm files)
POSITION_IDS = ORIGINAL_PREFIXES["text_encoder"] + "embeddings.position_ids"
# The parts as merges see them: ldm's EMA copy (model_ema.*) and the old text-encoder prefix as real files have them.
FILE_PARTS = FileParts(prefixes=MappingProxyType({"unet": (ORIGINAL_PREFIXES["unet"],),
                                                  "vae": (ORIGINAL_PREFIXES["vae"],),
                                                  "text_encoder": ("cond_stage_model.",)}),
                       ema="model_ema.", renamed=MappingProxyType({TEXT_ENCODER_OLD: ORIGINAL_PREFIXES["text_encoder"]}),
                       exact=(POSITION_IDS,))

# Every tensor in these models is a module's weight or bias; anything else (buffers, stray
# entries) must not slip through under a plausible-looking name.
_PARAMS = ("weight", "bias")

# ldm's ResBlock wraps its layers in Sequentials: in_layers = [norm, SiLU, conv],
# emb_layers = [SiLU, linear], out_layers = [norm, SiLU, Dropout, conv]; the indices skip the
# parameter-free modules.
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
# ldm's SpatialTransformer / BasicTransformerBlock use the same names as diffusers.
_TRANSFORMER = ("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK = (
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
    *(f"{attn}.{proj}" for attn in ("attn1", "attn2")
      for proj in ("to_q", "to_k", "to_v", "to_out.0")),
)
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}
# The original VAE attention projects with 1x1 convolutions where diffusers uses Linear.
_VAE_CONV_1X1 = ("q", "k", "v", "proj_out")
_CLIP_LAYER = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2",
)
# transformers < 5 wraps CLIPTextModel's modules in `text_model.`; 5 dropped the wrapper.
_CLIP_WRAPPER = "text_model."
_CLIP_BUFFERS = ("embeddings.position_ids",)


# ---------------------------------------------------------------------------------------------
# structure helpers


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The i for which some key starts with `{prefix}{i}.`: the block counts of this model."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    # A gap would shift every later ldm index, so refuse rather than guess.
    if found != set(range(len(found))):
        raise ValueError(f"indices of {prefix}* are {sorted(found)}, expected 0..n-1")
    return sorted(found)


def _renamed(src: str, dst: str, children: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    """Module map for one block: `src.child` → `dst.renamed_child` (same name for an iterable)."""
    pairs = children.items() if isinstance(children, Mapping) else ((c, c) for c in children)
    return {f"{src}.{a}": f"{dst}.{b}" for a, b in pairs}


def _spatial_transformer(keys: list[str], src: str, dst: str) -> dict[str, str]:
    modules = _renamed(src, dst, _TRANSFORMER)
    for k in _indices(keys, f"{src}.transformer_blocks."):
        block = f"transformer_blocks.{k}"
        modules |= _renamed(f"{src}.{block}", f"{dst}.{block}", _TRANSFORMER_BLOCK)
    return modules


def _key_map(component: str, keys: Iterable[str], modules: Mapping[str, str],
             rename: Callable[[str], str] = lambda key: key) -> dict[str, str]:
    """Full key map for one component, given its module map (diffusers module → ldm module).

    `rename` normalises a key before lookup (the CLIP wrapper prefix) while the returned map
    stays keyed by the caller's own key.
    """
    prefix = ORIGINAL_PREFIXES[component]
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        module, _, param = rename(key).rpartition(".")
        if param not in _PARAMS or module not in modules:
            raise ValueError(f"{component} key {key!r} has no counterpart in the original layout")
        target = f"{prefix}{modules[module]}.{param}"
        if target in seen:  # e.g. the same CLIP weight given with and without `text_model.`
            raise ValueError(f"{component} keys {seen[target]!r} and {key!r} both map "
                             f"to {target!r}")
        seen[target] = key
        out[key] = target
    return out


# ---------------------------------------------------------------------------------------------
# UNet


def _unet_down(keys: list[str]) -> dict[str, str]:
    # ldm numbers input_blocks in construction order: conv_in is 0, then each resnet (with its
    # attention beside it as .1) and each downsampler takes the next index — 3i+j+1 for SD 1.x.
    modules: dict[str, str] = {}
    n = 0
    for i in _indices(keys, "down_blocks."):
        block = f"down_blocks.{i}"
        for j in _indices(keys, f"{block}.resnets."):
            n += 1
            modules |= _renamed(f"{block}.resnets.{j}", f"input_blocks.{n}.0", _UNET_RESNET)
            modules |= _spatial_transformer(keys, f"{block}.attentions.{j}", f"input_blocks.{n}.1")
        if _indices(keys, f"{block}.downsamplers."):
            n += 1
            modules[f"{block}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    return modules


def _unet_up(keys: list[str]) -> dict[str, str]:
    # One output_block per resnet: [resnet, attention?]; the upsampler joins the block of the
    # up block's last resnet, after the attention when there is one (output_blocks.2.1 vs 5.2).
    modules: dict[str, str] = {}
    n = -1
    for i in _indices(keys, "up_blocks."):
        block = f"up_blocks.{i}"
        has_attention = bool(_indices(keys, f"{block}.attentions."))
        for j in _indices(keys, f"{block}.resnets."):
            n += 1
            modules |= _renamed(f"{block}.resnets.{j}", f"output_blocks.{n}.0", _UNET_RESNET)
            modules |= _spatial_transformer(keys, f"{block}.attentions.{j}", f"output_blocks.{n}.1")
        slot = 2 if has_attention else 1
        modules[f"{block}.upsamplers.0.conv"] = f"output_blocks.{n}.{slot}.conv"
    return modules


def unet_key_map(keys: Iterable[str], extra: Mapping[str, str] = MappingProxyType({})) -> dict[str, str]:
    """diffusers UNet2DConditionModel key → `model.diffusion_model.*` key, for the keys given.
    `extra`: more module renames, for a family's UNet with more modules (SDXL's added embedding)."""
    keys = list(keys)
    modules = {**extra,
        "conv_in": "input_blocks.0.0",
        # time_embed is Sequential(linear, SiLU, linear); out is Sequential(norm, SiLU, conv).
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0", "conv_out": "out.2",
        **_renamed("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        **_spatial_transformer(keys, "mid_block.attentions.0", "middle_block.1"),
        **_renamed("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    }
    modules |= _unet_down(keys) | _unet_up(keys)
    return _key_map("unet", keys, modules)


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_coder(keys: list[str], part: str) -> dict[str, str]:
    """encoder or decoder: stem, mid block and stem-out, which the two share."""
    return {
        f"{part}.conv_in": f"{part}.conv_in",
        f"{part}.conv_norm_out": f"{part}.norm_out",
        f"{part}.conv_out": f"{part}.conv_out",
        **_renamed(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
        **_renamed(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION),
        **_renamed(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
    }


def vae_key_map(keys: Iterable[str]) -> dict[str, str]:
    """diffusers AutoencoderKL key → `first_stage_model.*` key, for the keys given."""
    keys = list(keys)
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv",
               **_vae_coder(keys, "encoder"), **_vae_coder(keys, "decoder")}
    for i in _indices(keys, "encoder.down_blocks."):
        src, dst = f"encoder.down_blocks.{i}", f"encoder.down.{i}"
        for j in _indices(keys, f"{src}.resnets."):
            modules |= _renamed(f"{src}.resnets.{j}", f"{dst}.block.{j}", _VAE_RESNET)
        modules[f"{src}.downsamplers.0.conv"] = f"{dst}.downsample.conv"
    # ldm lists decoder.up by resolution (up.0 = full size, run last); diffusers lists
    # up_blocks in execution order, so the index is reversed.
    up_blocks = _indices(keys, "decoder.up_blocks.")
    for i in up_blocks:
        src, dst = f"decoder.up_blocks.{i}", f"decoder.up.{len(up_blocks) - 1 - i}"
        for j in _indices(keys, f"{src}.resnets."):
            modules |= _renamed(f"{src}.resnets.{j}", f"{dst}.block.{j}", _VAE_RESNET)
        modules[f"{src}.upsamplers.0.conv"] = f"{dst}.upsample.conv"
    return _key_map("vae", keys, modules)


def vae_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Linear [C, C] → 1x1 conv [C, C, 1, 1] for the mid attention projections (a view)."""
    module = key.rsplit(".", 2)[-2]
    if ".mid.attn_1." in key and module in _VAE_CONV_1X1 and key.endswith(".weight") \
            and tensor.ndim == 2:
        return tensor[:, :, None, None]
    return tensor


# ---------------------------------------------------------------------------------------------
# text encoder


def text_encoder_key_map(keys: Iterable[str]) -> dict[str, str]:
    """transformers CLIPTextModel key → `cond_stage_model.transformer.text_model.*` key.

    Accepts keys with or without the `text_model.` wrapper (transformers < 5 / ≥ 5) and leaves
    out the `position_ids` buffer, which is derived, not learnt (real SD 1.5 files vary here).
    """
    strip = lambda key: key.removeprefix(_CLIP_WRAPPER)  # noqa: E731
    keys = [key for key in keys if strip(key) not in _CLIP_BUFFERS]
    bare = [strip(key) for key in keys]
    modules = {name: name for name in
               ("embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm")}
    for n in _indices(bare, "encoder.layers."):
        modules |= _renamed(f"encoder.layers.{n}", f"encoder.layers.{n}", _CLIP_LAYER)
    return _key_map("text_encoder", keys, modules, rename=strip)


# ---------------------------------------------------------------------------------------------
# public entry points


def original_state_dict(unet_sd: Mapping[str, torch.Tensor],
                        vae_sd: Mapping[str, torch.Tensor] | None = None,
                        text_encoder_sd: Mapping[str, torch.Tensor] | None = None,
                        ) -> dict[str, torch.Tensor]:
    """One original-layout state dict from diffusers / transformers component state dicts.

    Tensors are the callers' own (only the VAE attention weights become 1x1-conv views), so a
    4 GB model is not duplicated in memory. Pass None for a component to leave it out.
    """
    parts = (
        (unet_sd, unet_key_map, lambda key, t: t),
        (vae_sd, vae_key_map, vae_tensor),
        (text_encoder_sd, text_encoder_key_map, lambda key, t: t),
    )
    out: dict[str, torch.Tensor] = {}
    for state, key_map, reshape in parts:
        if state is None:
            continue
        for src, dst in key_map(state.keys()).items():
            out[dst] = reshape(dst, state[src])
    return out


def _save_ckpt(tmp: Path, state_dict: Mapping[str, torch.Tensor],
               metadata: dict[str, str], global_step: int | None, stem: str) -> None:
    import pickle

    if "state_dict" in metadata:
        raise ValueError("metadata key 'state_dict' would shadow the weights in a .ckpt")
    # Tensors and strings only, so `torch.load(weights_only=True)` (how diffusers loads it) and
    # the webui's restricted unpickler accept it; on CPU so it loads without the training GPU.
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    extra = {} if global_step is None else {"global_step": int(global_step)}
    # torch.save's own pickling (storages as persistent ids, the format every torch.load
    # reads), but its records go through _WebuiCkptArchive, not torch's zip writer: that one
    # always adds records the webui refuses, and names the folder after the temporary file.
    # `_save(obj, zip_file, pickle_module, protocol, disable_byteorder_record)` since torch 2.1.
    with _WebuiCkptArchive(tmp, stem) as archive:
        torch.serialization._save({"state_dict": tensors, **metadata, **extra}, archive, pickle,
                                  torch.serialization.DEFAULT_PROTOCOL, False)


# The records AUTOMATIC1111's webui lets a .ckpt hold (modules/safe.py, check_zip_filenames:
# data.pkl, data/<n>, version, byteorder, .data/serialization_id under one folder); for any other
# it refuses the file as "may be malicious". Recent torch.save also writes .format_version and
# .storage_alignment, which torch.load does without (its default alignment is the 64 we keep).
_WEBUI_CKPT_RECORDS = re.compile(r"data\.pkl|data/\d+|byteorder")
# The archive format version torch.save writes (caffe2's kProducedFileFormatVersion);
# torch.load refuses an archive without it.
_CKPT_FORMAT_VERSION = b"3\n"
# torch's writer starts each record's data on a 64-byte boundary: torch.load(mmap=True)
# (ComfyUI) views tensors in place in the mapped file, so their bytes must be aligned.
_CKPT_ALIGNMENT = 64


class _WebuiCkptArchive:
    """Stands in for torch's zip writer: keeps the records the webui accepts and writes them
    stored (not compressed) and 64-byte aligned, as torch's own writer does, under `folder/`."""

    # a zip extra field that readers skip; the id torch's writer (miniz) pads with, "FB"
    _PAD_ID = 0x4246

    def __init__(self, path: Path, folder: str):
        import zipfile

        self._file = open(path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._folder = folder

    def __enter__(self) -> "_WebuiCkptArchive":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self._write(f"{self._folder}/version", _CKPT_FORMAT_VERSION)
            self._zip.close()
        finally:
            self._file.close()

    def write_record(self, name: str, data, size: int) -> None:
        if not _WEBUI_CKPT_RECORDS.fullmatch(name):
            return
        if isinstance(data, str):
            data = data.encode()
        elif not isinstance(data, (bytes, bytearray)):  # an untyped storage: its bytes, uncopied
            data = torch.empty(0, dtype=torch.uint8).set_(data).numpy()
        view = memoryview(data).cast("B")
        assert view.nbytes == size, (name, view.nbytes, size)
        self._write(f"{self._folder}/{name}", view)

    def _write(self, name: str, data) -> None:
        import struct
        import zipfile

        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size = len(data)
        # The local header ahead of the data: its fixed 30 bytes, the name, a zip64 field when
        # zipfile adds one (its own rule) and our padding field's 4-byte head.
        zip64 = size * 1.05 > zipfile.ZIP64_LIMIT
        header = 30 + len(name.encode("utf-8")) + (20 if zip64 else 0) + 4
        pad = -(self._file.tell() + header) % _CKPT_ALIGNMENT
        info.extra = struct.pack("<HH", self._PAD_ID, pad) + bytes(pad)
        with self._zip.open(info, "w", force_zip64=zip64) as f:
            f.write(data)


_WRITERS = {".safetensors": save_safetensors, ".ckpt": _save_ckpt}
WRITTEN_SUFFIXES = tuple(_WRITERS)  # what write_single_file writes: the formats export offers


def write_single_file(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None, global_step: int | None = None) -> Path:
    """Write `state_dict` as one `.safetensors` or `.ckpt` file (chosen by suffix); returns path.

    `global_step` goes where each format's readers look: an int beside the ckpt's state_dict
    (as the original SD checkpoints have it), a metadata string in safetensors.

    Written atomically (dbnb.core.weightfile): an interrupted export leaves no truncated file.
    """
    path = Path(path)
    writer = _WRITERS.get(path.suffix.lower())
    if writer is None:
        raise ValueError(f"cannot write {str(path)!r}: suffix must be one of "
                         f"{', '.join(WRITTEN_SUFFIXES)}")
    return write_atomically(path, writer, state_dict, metadata, global_step)
