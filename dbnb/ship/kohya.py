"""A LoRA checkpoint as the file AUTOMATIC1111's webui and ComfyUI load: kohya sd-scripts' layout.

  lora_unet_<diffusers module path, '.' → '_'>.lora_down.weight / .lora_up.weight / .alpha
  lora_te_text_model_<encoder module path>.…     (SD 1.x's CLIP text encoder)
  lora_te1_text_model_… / lora_te2_text_model_…  (SDXL's CLIP-L / OpenCLIP bigG)
  metadata ss_network_dim, ss_network_alpha, ss_base_model_version, ss_clip_skip, ss_tag_frequency, …

diffusers' `convert_state_dict_to_kohya` does the renaming; it writes `lora_unet_` and `lora_te1_`
prefixes and alpha = rank, so the family's prefixes (dbnb.family.base.Part.kohya_prefixes: one per
text encoder) and the trained alpha are set here. The text encoders keep the `text_model_` level,
which is what ComfyUI's comfy/lora.py maps (lora_te1_text_model_encoder_layers_N_self_attn_q_proj …).
Every file is read back with diffusers' `load_lora_weights` and must give the checkpoint's outputs.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from dbnb.core.errors import DbnbError
from dbnb.core.source_names import public_name
from dbnb.core.weights import open_safetensors
from dbnb.family.base import Family, Models, Parts, resolve_clip_skip
from dbnb.family.lora import Spec
from dbnb.train.optimizers import rates_of

TOLERANCE = 1e-4  # max abs difference of the denoiser / encoder outputs (both sides computed alike, in fp16)


class KohyaError(DbnbError, RuntimeError):
    """A LoRA file does not read back as trained; the message says what was wrong."""


def kohya_state_dict(denoiser: dict, encoder: dict, spec: Spec, dtype: torch.dtype,
                     parts: Parts) -> dict[str, torch.Tensor]:
    """peft-layout adapter state dicts of a family's denoiser and encoder → kohya keys with the
    family's prefixes, with each module's alpha."""
    out = _converted({f"unet.{k}": v for k, v in denoiser.items()}, "lora_unet_", parts.denoiser.kohya, spec, dtype)
    for member, prefix in parts.encoder.kohya_prefixes.items():
        mine = {k.removeprefix(f"{member}."): v for k, v in encoder.items() if not member or k.startswith(f"{member}.")}
        # the webui's CLIP keeps the `text_model.` level that transformers 5 dropped (4 has it)
        out |= _converted({"text_encoder." + ("" if k.startswith("text_model.") else "text_model.") + k: v
                           for k, v in mine.items()}, "lora_te1_", prefix, spec, dtype)
    return out


def _converted(peft: dict, written: str, prefix: str, spec: Spec, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers' kohya names of one part's peft keys (`unet.` / `text_encoder.` first, which its
    converter reads and replaces by `written`), under `prefix` instead, with each module's alpha."""
    from diffusers.utils import convert_state_dict_to_kohya  # lazy: loads diffusers

    out = {}
    for key, value in (convert_state_dict_to_kohya(peft) if peft else {}).items():
        if key.endswith(".alpha"):  # alpha / rank is the adapter's scale: keep the trained one
            value = torch.tensor(float(value) * spec.alpha / spec.rank)
        out[prefix + key.removeprefix(written)] = value.to(dtype).contiguous()
    return out


def metadata(config, spec: Spec, step: int, name: str, version: str, family: Family,
             prediction_type: str) -> dict[str, str]:
    """kohya's `ss_*` fields that the webui and LoRA browsers show, and dbnb's own; `prediction_type`
    is the base model's (its scheduler's): a v-prediction base's LoRA says so, as sd-scripts' does."""
    from dbnb.data.dataset import DatasetError, caption_for, list_images  # lazy: loads PIL

    _, *rates = rates_of(config)
    members = family.parts.encoder.members
    # kohya's one text-encoder rate field holds the first encoder's; each encoder's is dbnb's own
    encoder_rates = dict(zip(members, rates)) if spec.text_encoder_rank else {m: 0 for m in members}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(spec.rank),
            "ss_network_alpha": str(spec.alpha), "ss_base_model_version": family.kohya_version, "ss_v2": "False",
            "ss_v_parameterization": str(prediction_type == "v_prediction"),
            "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_output_name": name,
            "ss_clip_skip": str(resolve_clip_skip(family, config.clip_skip)),
            "ss_steps": str(step), "ss_unet_lr": str(config.lora_learning_rate),
            "ss_text_encoder_lr": str(rates[0] if spec.text_encoder_rank else 0),
            "ss_sd_model_name": public_name(config.pretrained_model_name_or_path), "ss_training_comment": f"dbnb {version}",
            "dbnb_version": version, "dbnb_instance_prompt": config.instance_prompt}
    if len(members) > 1:
        meta["dbnb_text_encoder_lrs"] = json.dumps({m: str(r) for m, r in encoder_rates.items()})
    if spec.conv_rank:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(spec.conv_rank), "conv_alpha": str(spec.conv_alpha)})
    try:
        images = list_images(config.instance_data_dir, "instance_data_dir")
    except DatasetError:  # the dataset moved since training: the file is complete without these
        return meta
    meta["ss_num_train_images"] = str(len(images))
    tags = Counter(t.strip() for p in images for t in caption_for(p).split(",") if t.strip())
    if tags:
        meta["ss_tag_frequency"] = json.dumps({Path(config.instance_data_dir).name: dict(tags)}, ensure_ascii=False)
    return meta


def is_lora_file(path: Path) -> bool:
    """Whether the file at `path` is a LoRA `metadata` describes (not a whole model), from its header alone."""
    if path.suffix != ".safetensors":
        return False
    with open_safetensors(path) as f:
        return "ss_network_module" in (f.metadata() or {})


# --- reading it back -------------------------------------------------------------------------------

PROBE_PROMPT = "a photo of sks girl, 1girl, solo"
Outputs = tuple[dict[str, torch.Tensor], torch.Tensor]  # (the encoder's conditioning, the denoiser's output)


def _probe(models: Models) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Fixed inputs: token inputs (one per tokenizer), noisy latents, a timestep."""
    inputs = {name: tokenize([PROBE_PROMPT], padding="max_length", truncation=True,
                             max_length=tokenize.model_max_length, return_tensors="pt").input_ids
              for name, tokenize in models.tokenizers.items()}
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, models.denoiser.config.in_channels, 16, 16, generator=g)
    return inputs, latents, torch.tensor([500])


@torch.no_grad()
def outputs(models: Models, family: Family, conditioning: dict[str, torch.Tensor] | None = None) -> Outputs:
    """(encoder conditioning, denoiser output) on the fixed inputs, returned in fp32; the denoiser gets
    `conditioning` when given, so a difference in one model does not show up as one in the other."""
    inputs, latents, t = _probe(models)
    encoded = family.encode_prompts(models.encoder, inputs)  # its own clip skip
    given = encoded if conditioning is None else conditioning
    dtype = models.denoiser.dtype  # the base as opened (fp16: a full-size SDXL in fp32 is over Colab's RAM)
    predicted = family.predict(models.denoiser, latents.to(dtype), t, {k: v.to(dtype) for k, v in given.items()})
    return {k: v.float() for k, v in encoded.items()}, predicted.float()


def differences(a: Outputs, b: Outputs) -> tuple[float, float]:
    """The max abs difference of the encoder's conditioning and of the denoiser's output."""
    encoder = max((a[0][k] - b[0][k]).abs().max().item() for k in a[0])
    return encoder, (a[1] - b[1]).abs().max().item()


def _lora_modules(model) -> int:
    from peft.tuners.lora import LoraLayer  # lazy: loads peft, transformers, accelerate

    return sum(isinstance(m, LoraLayer) for m in model.modules())


def load_file_into(models: Models, path: Path, parts: Parts) -> None:
    """diffusers' own reading of a kohya file (the pipeline's `load_lora_weights`) onto `models`;
    every module in the file must land on a layer: a key diffusers ignores is an error."""
    from safetensors.torch import load_file  # lazy: loads safetensors

    state = load_file(str(path))
    denoiser, encoder = parts.denoiser.kohya, tuple(parts.encoder.kohya_prefixes.values())
    want_denoiser = sum(k.startswith(denoiser) and k.endswith("lora_down.weight") for k in state)
    want_encoder = sum(k.startswith(encoder) and k.endswith("lora_down.weight") for k in state)
    other = [k for k in state if not k.startswith((denoiser, *encoder))]
    if other:
        raise KohyaError(f"{path.name}: keys the webui does not read, e.g. {other[0]}.")
    if _transformers_takes_this_peft():
        # folder + weight_name: diffusers < 0.32 refuses a bare file path when the Hub is offline
        models.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="file")
    else:
        _load_around_the_peft_pin(models, state, parts)
    got_denoiser, got_encoder = _lora_modules(models.denoiser), _lora_modules(models.encoder)
    if (got_denoiser, got_encoder) != (want_denoiser, want_encoder):
        raise KohyaError(f"{path.name}: diffusers' load_lora_weights put {got_denoiser} of {want_denoiser} "
                         f"{parts.denoiser.label} and {got_encoder} of {want_encoder} {parts.encoder.label} modules "
                         "on the model: the other keys are ignored.")


def _transformers_takes_this_peft() -> bool:
    """transformers' adapter loading refuses peft releases below its own pin (5.24 wants >= 0.22)."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION  # lazy: optional transformers
        from transformers.utils.peft_utils import check_peft_version  # lazy: optional transformers

        check_peft_version(min_version=MIN_PEFT_VERSION)
    except ValueError:
        return False
    except ImportError:
        return True
    return True


def _load_around_the_peft_pin(models: Models, state: dict, parts: Parts) -> None:
    """The denoiser through the pipeline's `load_lora_weights`; the encoders' part converted by
    diffusers (`lora_state_dict`, as load_lora_weights does; its keys start with each text encoder's
    name in the pipeline) and injected with peft itself, which is what transformers' refused
    `load_adapter` would do."""
    denoiser_part = {k: v for k, v in state.items() if k.startswith(parts.denoiser.kohya)}
    encoder_part = {k: v for k, v in state.items() if k.startswith(tuple(parts.encoder.kohya_prefixes.values()))}
    if denoiser_part:
        models.pipe.load_lora_weights(denoiser_part, adapter_name="file")
    if not encoder_part:
        return
    converted, alphas = models.pipe.lora_state_dict(encoder_part)
    for module in [models.encoder[m] for m in parts.encoder.members] or [models.encoder]:
        name = next(n for n, part in models.pipe.components.items() if part is module)
        _inject(module, converted, alphas or {}, f"{name}.", parts.encoder.label)


def _inject(encoder, converted: dict, alphas: dict, prefix: str, label: str) -> None:
    """The adapters under `prefix` (the text encoder's pipeline name) of diffusers' reading, put on `encoder`."""
    # lazy: loads diffusers, yaml, PIL
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    # lazy: loads diffusers, yaml, PIL
    from diffusers.utils.peft_utils import _create_lora_config  # diffusers' own reading, private
    from peft import inject_adapter_in_model, set_peft_model_state_dict  # lazy: loads peft, transformers, accelerate

    mine = {k.removeprefix(prefix): v for k, v in converted.items() if k.startswith(prefix)}
    if not mine:
        return
    mine = convert_state_dict_to_peft(convert_state_dict_to_diffusers(mine))
    if "text_model" not in dict(encoder.named_children()):  # transformers 5 dropped CLIP's wrapper module
        mine = {k.removeprefix("text_model."): v for k, v in mine.items()}
    alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    rank = {k: v.shape[1] for k, v in mine.items() if k.endswith("lora_B.weight")}
    config = _create_lora_config(mine, alphas, None, rank, is_unet=False)
    inject_adapter_in_model(config, encoder, adapter_name="file")
    result = set_peft_model_state_dict(encoder, mine, adapter_name="file")
    if result.unexpected_keys:
        raise KohyaError(f"{label} keys that fit no layer, e.g. {result.unexpected_keys[0]}.")


def verify(path: Path, expected: Outputs, load_base, family: Family) -> float:
    """Load the file onto a fresh base model (`load_base()`: Models, fp16) the way diffusers does and
    compare its outputs with `expected` (the checkpoint's); returns the max abs difference."""
    models = load_base()
    try:
        load_file_into(models, path, family.parts)
    except KohyaError:
        raise
    except Exception as e:  # noqa: BLE001 — whatever diffusers trips on, the file is bad
        raise KohyaError(f"{path.name} does not load with diffusers' load_lora_weights: {e}") from e
    diff = max(differences(outputs(models, family, conditioning=expected[0]), expected))
    if not diff <= TOLERANCE:
        raise KohyaError(f"{path.name} read back with diffusers gives outputs {diff:.2e} away from the trained "
                         f"checkpoint's (at most {TOLERANCE:g} allowed).")
    return diff
