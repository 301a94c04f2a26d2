"""SD 1.x as a model family (dbnb.family.base.Family): one CLIP tokenizer and text encoder,
a UNet conditioned on the encoder's last hidden states, the VAE in fp32.

What the trainer used to do to the components itself is here: which parts are frozen and in
which dtype, the LoRA adapters (dbnb.family.sd1.adapters' targets), xformers, gradient
checkpointing, the text encoding and the UNet call.
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from dbnb.family.base import AdapterTargets, Card, ClipSkipError, Models, Part, Parts, resolve_clip_skip
from dbnb.family.sd1 import adapters, autoencoder
from dbnb.family.sd1.webui import WebuiFile


class SD1Family:
    name = "sd1"
    parts = Parts(denoiser=Part("unet", "UNet", "diffusion_pytorch_model.safetensors", kohya="lora_unet_"),
                  encoder=Part("text_encoder", "text encoder", "model.safetensors", kohya="lora_te_"))
    single_file = WebuiFile()
    card = Card("Stable Diffusion 1.x", "SD 1.x", "creativeml-openrail-m",
                ("stable-diffusion", "stable-diffusion-diffusers"))
    kohya_version = "sd_v1"  # sd-scripts' model_util.get_model_version_str_for_sd1_sd2 for SD 1.x
    clip_skip = 1  # trained on the last layer; anime bases (NovelAI's descendants) are used at 2
    clip_skips = range(1, 13)  # CLIP-L's 12 layers, as the webui's "Clip skip" slider offers them

    def recognizes(self, source: str) -> bool:
        return True  # the fallback: dbnb.family.sd1.load says what is not an SD 1.x model

    def open(self, source: str, *, autoencoder: str = "", revision: str = "",
             dtype: torch.dtype | None = None) -> Models:
        from dbnb.family.sd1.load import load_pipeline

        return self.models_of(load_pipeline(source, vae=autoencoder, revision=revision, dtype=dtype))

    def load(self, config, device: torch.device, weight_dtype: torch.dtype) -> Models:
        from diffusers import DDPMScheduler

        from dbnb.family.sd1.load import fingerprint, load_pipeline

        resolve_clip_skip(self, config.clip_skip)  # a value it does not take: said before the model loads
        pipe = load_pipeline(config.pretrained_model_name_or_path, vae=config.pretrained_vae_name_or_path,
                             revision=config.revision)
        base = fingerprint(pipe)  # as loaded: before casts and adapters change what the weights read
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.to(device)
        set_up(pipe.unet, pipe.text_encoder, pipe.vae, config, weight_dtype)
        set_attention(pipe.unet, config.attention, device)
        return self.models_of(pipe, noise_scheduler, base)

    def models_of(self, pipe, noise_scheduler=None, base: dict | None = None) -> Models:
        """A StableDiffusionPipeline's parts by role."""
        norm_where_diffusers_reads_it(pipe.text_encoder)
        return Models(denoiser=pipe.unet, encoder=pipe.text_encoder, autoencoder=pipe.vae,
                      tokenizers={"input_ids": pipe.tokenizer}, noise_scheduler=noise_scheduler,
                      latent_scale=pipe.vae.config.scaling_factor, pipe=pipe, base=base or {})

    def pipeline(self, models: Models, unet):
        pipe = models.pipe
        return pipe.__class__(**{**pipe.components, "unet": unet}, requires_safety_checker=False)

    def adapter_targets(self, unet, text_encoder, spec) -> AdapterTargets:
        return adapters.targets(unet, text_encoder, spec)

    def part_configs(self, source: str) -> dict[str, dict]:
        """The memory planner's: the parts' config files (what shapes them), by component."""
        from dbnb.family.sd1.memory import component_config

        return {part: component_config(source, part) for part in ("unet", "text_encoder", "vae")}

    def empty_parts(self, config, weight_dtype: torch.dtype):
        """The memory planner's: the parts on the meta device, set up to train (dbnb.family.sd1.memory)."""
        from dbnb.family.sd1.memory import empty_parts

        return empty_parts(config, weight_dtype)

    def encode_images(self, vae, images: torch.Tensor):
        return autoencoder.encode(vae, images)

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(vae, latents)

    def encode_prompts(self, text_encoder, inputs: dict[str, torch.Tensor],
                       clip_skip: int = 0) -> dict[str, torch.Tensor]:
        return {"hidden_states": clip_skipped(text_encoder, inputs["input_ids"], resolve_clip_skip(self, clip_skip))}

    def predict(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        return unet(noisy, timesteps, conditioning["hidden_states"]).sample


def clip_skipped(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The text encoder's hidden states `clip_skip` layers from its end (1: the last), through its
    final layer norm, as the webui, kohya and diffusers' pipelines condition on a skipped layer."""
    if clip_skip == 1:
        return text_encoder(input_ids)[0]  # the last hidden state, already normed
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ClipSkipError(f"clip_skip={clip_skip}: this text encoder has {layers} layers; set clip_skip to "
                            f"at most {layers} (2 for anime bases), or 0 for the last layer.")
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    return final_layer_norm(text_encoder)(hidden)


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """CLIP's final layer norm, under transformers 4's `text_model.` level or without it (5)."""
    return text_encoder.text_model.final_layer_norm if "text_model" in dict(text_encoder.named_children()) \
        else text_encoder.final_layer_norm


def norm_where_diffusers_reads_it(text_encoder) -> None:
    """diffusers' SD pipeline renders at a clip_skip through `text_encoder.text_model.final_layer_norm`,
    a level transformers 5 dropped: there it gets a view of the encoder's own norm, outside the
    module tree (no state-dict key, no adapter target)."""
    if not hasattr(text_encoder, "text_model"):
        object.__setattr__(text_encoder, "text_model", SimpleNamespace(final_layer_norm=text_encoder.final_layer_norm))


def set_up(unet, text_encoder, vae, config, weight_dtype: torch.dtype, family=None,
           members: list | None = None) -> None:
    """The parts made ready to train, in place: by `SD1Family.load` on the loaded model, and by
    dbnb.family.sd1.memory on weightless ones for the memory planner, so both see the same setup.
    Another family with SD 1.x's parts (SDXL) passes itself, for its adapters' names, and its text
    encoders (`members`) when `text_encoder` holds several."""
    from dbnb.family import lora  # lazy: peft, only where adapters are added

    # Frozen parts run in the mixed-precision dtype, the VAE aside (dbnb.family.sd1.autoencoder: fp32);
    # trained parts keep fp32 master weights.
    vae.requires_grad_(False)
    text_encoder.requires_grad_(config.fine_tunes_text_encoder)
    if weight_dtype != torch.float32:
        if not config.fine_tunes_text_encoder:
            text_encoder.to(dtype=weight_dtype)
        if config.use_lora:  # the UNet is frozen too: only the adapters keep fp32 master weights
            unet.to(dtype=weight_dtype)
    if config.use_lora:
        lora.add_adapters(unet, text_encoder, lora.Spec.from_config(config), family or SD1, seed=config.seed)
    checkpoint_gradients(unet, members or [text_encoder], config)


def checkpoint_gradients(unet, text_encoders: list, config) -> None:
    """gradient_checkpointing: on the UNet, and on the text encoders where they learn (SDXL's too)."""
    if not config.gradient_checkpointing:
        return
    unet.enable_gradient_checkpointing()
    if config.trains_text_encoder:
        for text_encoder in text_encoders:
            text_encoder.gradient_checkpointing_enable()
            if config.use_lora:  # frozen embeddings: the checkpointed layers still need a grad-carrying input
                text_encoder.enable_input_require_grads()


def set_attention(unet, attention: str, device: torch.device) -> None:
    """attention=xformers where it runs; PyTorch SDPA (diffusers' default) otherwise."""
    from dbnb.core.hardware import check_xformers

    if attention != "xformers":
        return
    check = check_xformers(device.type)
    if check.ok:
        unet.enable_xformers_memory_efficient_attention()
    else:
        warnings.warn(f"attention=xformers: {check.detail}; using PyTorch SDPA instead.", stacklevel=3)


SD1 = SD1Family()
