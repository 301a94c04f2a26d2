"""The model-family seam: what the trainer asks of a model family, and which family a model is.

The trainer (dbnb.train.loop, dbnb.train.loss) and the batches (dbnb.data.batches) work on
roles, never on a family's components: a `denoiser` that predicts the noise and always learns
(as weights or as adapters), an `encoder` that turns the batches' token inputs into the
denoiser's conditioning (learning when config.trains_text_encoder says so), an `autoencoder`
that turns pictures into latents. A family with two tokenizers carries two entries in the
batches' token inputs; one with two text encoders and a pooled embedding returns them all in
its conditioning dict. dbnb ships SD 1.x (dbnb.family.sd1) and SDXL (dbnb.family.sdxl).

What comes after training asks the family too: how its parts are named in a checkpoint's
folders and files (`Part`: dbnb.run.checkpoints, dbnb.family.lora, dbnb.ship.kohya), which
modules get LoRA adapters (`adapter_targets`), the pipeline that renders with a given denoiser
(`pipeline`: previews, test grids, class images), the base model to render or export from
(`open`), and the one file exports write, read back and convert to a folder (`single_file`: dbnb.ship.export)
and merges combine, a part at a time by its layout's prefixes (`SingleFile.parts`: dbnb.ship.merge).

Which family a model is: `for_model(source)` asks the registered families (newest first), then
the shipped ones besides SD 1.x (SDXL, dbnb.family.sdxl), whether they recognize the source and
falls back to SD 1.x. `register(family)` adds one: a
test's stand-in, or a user's own family, without any edit to the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, runtime_checkable

import torch

from dbnb.core.errors import DbnbError


# The batches' size conditioning inputs when bucketing ((height, width) pairs, [N, 2] each, in
# this order; dbnb.data.bucketed), named as diffusers' SDXL pipelines name them; a family
# conditioned on sizes reads them from encode_prompts' inputs (SDXL: its time ids).
SIZE_INPUTS = ("original_size", "crops_coords_top_left", "target_size")


@dataclass(kw_only=True)
class Models:
    """One family's base model, loaded and set up to train, as the trainer sees it."""
    denoiser: torch.nn.Module      # predicts the noise (or velocity) from noisy latents: always learns
    encoder: torch.nn.Module       # the prompt encoder(s): learns when config.trains_text_encoder
    autoencoder: torch.nn.Module   # pictures -> latent distributions; frozen
    tokenizers: dict[str, object]  # one per token input the batches carry, by that input's name
    noise_scheduler: object        # the training noise schedule (diffusers' DDPMScheduler API)
    latent_scale: float            # the autoencoder's scaling_factor: latents are scaled by it before noising
    pipe: object                   # the family's own pipeline of these parts, if it has one (previews)
    base: dict[str, str]           # the base model's fingerprint as loaded (RunFolder.record_base / check_base)


@dataclass(frozen=True)
class Part:
    """How a family names one trained part where it is saved and said (dbnb.run.checkpoints,
    dbnb.family.lora): SD 1.x's UNet is Part("unet", "UNet", "diffusion_pytorch_model.safetensors", "lora_unet_")."""
    name: str   # its folder in a checkpoint (its EMA's: `ema`), its adapters' file stem and key prefix
    label: str  # in messages
    file: str   # its weights file in its folder
    kohya: str  # its adapters' key prefix in a kohya-layout LoRA file, the webui's (dbnb.ship.kohya)
    # A part of several models in one ModuleDict (SDXL's two text encoders): their names there, which
    # its adapters' keys start with; in a kohya file each has its own prefix (kohya_prefixes).
    members: tuple[str, ...] = ()

    @property
    def ema(self) -> str:
        """The folder of its EMA weights."""
        return f"{self.name}_ema"

    @property
    def kohya_prefixes(self) -> dict[str, str]:
        """Its adapters' kohya key prefix by member ("" for a part of one model): SDXL's encoders'
        {"te1": "lora_te1_", "te2": "lora_te2_"}, SD 1.x's text encoder's {"": "lora_te_"}."""
        return {m: f"{self.kohya}{m}_" for m in self.members} or {"": self.kohya}


def under(state: dict, name: str) -> dict:
    """The entries of a ModuleDict's `state` dict that belong to its module `name`, keyed as that
    module's own (SDXL's encoder role: "te1.text_model..." → "text_model...")."""
    return {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}


@dataclass(frozen=True)
class Parts:
    """A family's trained parts by role."""
    denoiser: Part
    encoder: Part


@dataclass(frozen=True)
class AdapterTargets:
    """Which modules of a denoiser and an encoder get LoRA adapters, by module path (dbnb.family.lora)."""
    denoiser: list[str]        # at lora_rank
    denoiser_convs: list[str]  # 3x3 convs at lora_conv_rank (LoCon; empty unless conv_rank)
    encoder: list[str]         # at lora_text_encoder_rank


@dataclass(frozen=True)
class Card:
    """How a family is named where people read about a run (dbnb.ship.report: the report, the Hub card)."""
    title: str             # "Stable Diffusion 1.x": the card's first line
    short: str             # "SD 1.x": in the report's lines
    license: str           # the Hub licence id of its reference base (the user edits it for another base's)
    tags: tuple[str, ...]  # the Hub tags of models made from it


def card_of(family) -> Card:
    """`family`'s Card (its optional `card`); for one without (a stand-in, a user's own) one of its name."""
    return getattr(family, "card", None) or Card(family.name, family.name, "other", ())


@dataclass(frozen=True)
class FileParts:
    """Where a family's parts sit in its single file, as merges (dbnb.ship.merge) combine them."""
    prefixes: Mapping[str, tuple[str, ...]]  # merged part (unet, vae, text_encoder) → its keys' prefixes
    ema: str                        # the prefix of the EMA copy some files carry (dropped: loaders use the weights)
    renamed: Mapping[str, str]      # an old prefix other tools wrote → the one loaders read today
    exact: tuple[str, ...] = ()     # int buffers (position ids): written as 0..n-1, never averaged

    def part_of(self, key: str) -> str | None:
        """The merged part `key` belongs to; None for keys outside them (buffers, markers)."""
        return next((part for part, prefixes in self.prefixes.items() if key.startswith(prefixes)), None)


class SingleFile(Protocol):
    """A family's one-file format (SD 1.x's: the webui's checkpoint), which dbnb.ship.export writes.
    The parts' state dicts go in by role: denoiser, autoencoder, encoder."""

    suffixes: tuple[str, ...]  # the files it writes (".safetensors", ".ckpt")

    def state_dict(self, denoiser: dict, autoencoder: dict, encoder: dict, base: str = "") -> dict[str, torch.Tensor]:
        """The parts as one state dict in the file's layout; `base`: the model they come from, for a
        format that marks how its model samples (SDXL's v_pred / ztsnr keys)."""

    def keys(self, denoiser: dict, autoencoder: dict, encoder: dict, base: str = "") -> set[str]:
        """The keys `state_dict` of these parts (from `base`) holds."""

    def keys_and_shapes(self, path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
        """A written file's keys and shapes, reading no tensor where the format allows."""

    def entries(self, path, stack) -> dict:
        """A written file's tensors by key, each (read it, its shape), read only when asked for and
        the file's pages let go as it is read; the file stays open until `stack` (an ExitStack) closes."""

    def write(self, path, state: dict, **options):
        """Write `state` to `path` (its suffix says which format) under a temporary name first."""

    def remove_leftovers(self, folder) -> list:
        """Delete the temporary files a killed write left in `folder`."""

    def read_back(self, path, keys: list[str], shapes: dict, dtype: torch.dtype) -> Models:
        """The file at `path` loaded as its users' loaders load it, its parts by role."""

    def to_folder(self, path, folder, records: dict[str, dict]):
        """The file at `path` as a diffusers folder `folder` (absent or empty) to train from, in fp32,
        with `records` (file name → JSON content) beside the parts; returns `folder`."""

    # Optional, for merges (dbnb.ship.merge); a family without them is not merged.
    parts: FileParts  # where its parts sit in the file

    def folder_entries(self, folder, stack) -> dict:
        """A diffusers folder of the family seen in the file's layout, as `entries` sees a file."""

    def weight_files(self, path) -> list:
        """The files a model's hash covers: the file itself, or a folder's weight files."""

    def architecture(self, keys, shapes: dict, source: str) -> str:
        """Which of the family's shapes a file of these keys is (models merge only with their own);
        a DbnbError naming `source` when it is none."""

    def sampling(self, keys) -> str:
        """How a model of these keys samples, as its file marks it ("epsilon", "v-prediction", …)."""


@runtime_checkable
class Family(Protocol):
    """A model family, as the trainer uses it. Everything component-specific lives behind it:
    what is frozen or cast, which modules get LoRA adapters, gradient checkpointing, attention.
    Optional, for the memory planner (dbnb.train.planner): `part_configs(source)`, the parts'
    config files, and `empty_parts(config, weight_dtype)`, the parts built without weights and set
    up to train (SD 1.x's: dbnb.family.sd1.memory); a family without them is not planned.
    Optional, for cached text embeddings (dbnb.data.textcache): `size_conditioning(inputs)`, the
    part of encode_prompts' conditioning that comes from the batch's size inputs, not its prompts
    (SDXL's time ids), added to each batch's looked-up embeddings; a family without it has none.
    Optional too, `memory_rules()`: a module with memory_profile=auto's tiers for the family
    (`auto_settings(config)`), what it refuses on a card (`refusal(config, gpu)`) and the
    system RAM its load and export hold (`load_ram(trace)`, `export_ram(trace)`): SDXL's dbnb.family.sdxl.memory.
    Optional too, `card`: how the report and the model card name it (Card; `card_of`)."""

    name: str
    parts: Parts  # how its denoiser and encoder are named in checkpoints and messages
    kohya_version: str  # kohya's ss_base_model_version of its LoRA files (SD 1.x: "sd_v1")
    # The clip skip it was trained at, counted as the webui and kohya count (1: the last layer,
    # 2: the penultimate): what clip_skip=0 means, and what diffusers' pipelines do unasked.
    clip_skip: int
    clip_skips: range  # the clip_skip values it takes besides 0 (a ClipSkipError names the others)
    single_file: SingleFile | None  # its one-file format, which exports write; None: none yet (exports refuse)

    def recognizes(self, source: str) -> bool:
        """Whether `source` (pretrained_model_name_or_path) is a model of this family."""

    def open(self, source: str, *, autoencoder: str = "", revision: str = "",
             dtype: torch.dtype | None = None) -> Models:
        """The model at `source` (with the autoencoder at `autoencoder` when given) as it is, to render
        or export with: nothing frozen, cast (but to `dtype`) or adapted; no noise_scheduler."""

    def load(self, config, device: torch.device, weight_dtype: torch.dtype) -> Models:
        """The base model of `config` on `device`, ready to train: frozen parts in `weight_dtype`,
        trained ones in fp32, adapters added (use_lora), memory and attention switches set."""

    def adapter_targets(self, denoiser: torch.nn.Module, encoder: torch.nn.Module, spec) -> AdapterTargets:
        """The modules that get LoRA adapters of `spec` (dbnb.family.lora.Spec's shapes)."""

    def pipeline(self, models: Models, denoiser: torch.nn.Module):
        """A diffusers pipeline of `models` that renders with `denoiser` in place of the loaded one
        (previews: the one being trained); its other parts are `models`' own, where they are."""

    def encode_images(self, autoencoder: torch.nn.Module, images: torch.Tensor):
        """The latent distribution (`.mean`, `.std`, unscaled) of `images` in [-1, 1], under
        the family's precision rule for its autoencoder."""

    def decode_latents(self, autoencoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Pictures in [-1, 1] from unscaled latents (as a sampler leaves them), under the family's
        precision rule for its autoencoder (dbnb.family.render)."""

    def encode_prompts(self, encoder: torch.nn.Module, inputs: dict[str, torch.Tensor],
                       clip_skip: int = 0) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning from the batch's token inputs (already on the device), from
        the encoder layer `clip_skip` says (the clip_skip setting; 0: the family's own)."""

    def predict(self, denoiser: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        """The denoiser's output (noise, or velocity for v-prediction) for `noisy` at `timesteps`."""


FAMILIES: list[Family] = []  # registered families besides SD 1.x, asked newest first


def register(family: Family) -> Family:
    """Add `family`: `for_model` asks it before the families registered earlier and SD 1.x."""
    if not isinstance(family, Family):
        raise TypeError(f"{family!r} does not implement dbnb.family.base.Family")
    FAMILIES.insert(0, family)
    return family


def shipped() -> list[Family]:
    """The families dbnb ships besides SD 1.x, asked after the registered ones."""
    from dbnb.family.sdxl.family import SDXL  # lazy: the family module imports this one

    return [SDXL]


def default() -> Family:
    """SD 1.x, the family of every model no registered family recognizes."""
    from dbnb.family.sd1.family import SD1

    return SD1


def for_model(source: str) -> Family:
    """The family of the model at `source` (a folder, repo id, single file or URL)."""
    for family in (*FAMILIES, *shipped()):
        if family.recognizes(str(source)):
            return family
    return default()


def named(name: str) -> Family | None:
    """The family called `name` among the registered and the shipped ones; None when none is."""
    return next((family for family in (*FAMILIES, *shipped(), default()) if family.name == name), None)


class ClipSkipError(DbnbError, ValueError):
    """clip_skip names a layer the family does not condition on; the message says what to set."""


def resolve_clip_skip(family: Family, clip_skip: int) -> int:
    """The clip_skip setting as the layer it means for `family` (0: the family's own), counted as
    the webui and kohya count; a ClipSkipError for a value the family does not take."""
    if clip_skip == 0:
        return family.clip_skip
    if clip_skip not in family.clip_skips:
        first, last = family.clip_skips[0], family.clip_skips[-1]
        takes = f"{first}" if first == last else f"{first} to {last}"
        raise ClipSkipError(f"clip_skip={clip_skip}: {family.name} models take clip_skip {takes} (1: the text "
                            f"encoder's last layer, 2: the penultimate), or 0 for the one it was trained at "
                            f"({family.clip_skip}). Set clip_skip to one of these.")
    return clip_skip


def pipeline_clip_skip(family: Family, clip_skip: int) -> int | None:
    """diffusers pipelines' `clip_skip` argument for the clip_skip setting: they count the layers
    skipped beyond the family's own (SD 1.x's pipeline: 1 is the penultimate layer; SDXL's: None is
    already the penultimate), the webui and kohya from the last layer (2: the penultimate)."""
    return resolve_clip_skip(family, clip_skip) - family.clip_skip or None


def family_of(config) -> Family:
    """The family of `config`'s base model."""
    return for_model(config.pretrained_model_name_or_path)
