"""SDXL as a model family (dbnb.family.base.Family): two CLIP text encoders (CLIP-L, OpenCLIP
bigG) whose penultimate hidden states, side by side, condition the UNet, with text_encoder_2's
pooled projection and the size / crop time ids as its added conditioning; the VAE in fp32.

The encoder role is both text encoders in one ModuleDict under kohya's names for them (`te1`,
`te2`), so their adapters and checkpoint keys say which is which. The conditioning follows
diffusers' train_dreambooth_lora_sdxl.py (encode_prompt, compute_time_ids).
"""
from __future__ import annotations

import torch

from dbnb.core.errors import DbnbError
from dbnb.family.base import SIZE_INPUTS, AdapterTargets, Models, Part, Parts
from dbnb.family.sd1 import adapters, autoencoder
from dbnb.family.sd1.family import checkpoint_gradients, set_attention
from dbnb.family.sdxl import load
from dbnb.family.sdxl.webui import SDXLFile

ENCODERS = ("te1", "te2")   # text_encoder (CLIP-L), text_encoder_2 (bigG, with the pooled projection)
TOKEN_INPUTS = ("input_ids", "input_ids_2")  # one per tokenizer, the batches' token inputs
LATENT_FACTOR = 8  # every SDXL VAE halves the picture three times: a latent pixel is 8x8 pixels


class SDXLError(DbnbError, ValueError):
    """A setting SDXL training does not support yet; the message says what to set instead."""


class SDXLFamily:
    name = "sdxl"
    parts = Parts(denoiser=Part("unet", "UNet", "diffusion_pytorch_model.safetensors", kohya="lora_unet_"),
                  # kohya's lora_te1_ / lora_te2_: its "lora_" and the encoders' own names (ENCODERS)
                  encoder=Part("text_encoders", "text encoders", "model.safetensors", kohya="lora_"))
    single_file = SDXLFile()  # the original (sgm) layout the webui and ComfyUI load

    def recognizes(self, source: str) -> bool:
        return load.is_sdxl(source)

    def open(self, source: str, *, autoencoder: str = "", revision: str = "",
             dtype: torch.dtype | None = None) -> Models:
        return self.models_of(load.load_pipeline(source, vae=autoencoder, revision=revision, dtype=dtype))

    def load(self, config, device: torch.device, weight_dtype: torch.dtype) -> Models:
        from diffusers import DDPMScheduler

        from dbnb.family.sd1.load import fingerprint

        if config.fine_tunes_text_encoder:  # a checkpoint saves a trained encoder as one transformers folder
            raise SDXLError("SDXL: fine-tuning the text encoders (train_text_encoder with use_lora off) is not "
                            "supported yet. Set train_text_encoder=False to fine-tune the UNet alone, or "
                            "use_lora=True with lora_text_encoder_rank > 0 to train both encoders' adapters.")
        pipe = load.load_pipeline(config.pretrained_model_name_or_path, vae=config.pretrained_vae_name_or_path,
                                  revision=config.revision)
        if 2 ** (len(pipe.vae.config.block_out_channels) - 1) != LATENT_FACTOR:
            vae = config.pretrained_vae_name_or_path or f"{config.pretrained_model_name_or_path}'s own"
            raise SDXLError(f"The VAE ({vae}) does not scale pictures by {LATENT_FACTOR} as SDXL's does: set "
                            "pretrained_vae_name_or_path to an SDXL VAE, or '' for the base model's own.")
        base = fingerprint(pipe, load.FINGERPRINT_PARTS)  # as loaded: before casts and adapters
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.to(device)
        models = self.models_of(pipe, noise_scheduler, base)
        set_up(models, config, weight_dtype)
        set_attention(pipe.unet, config.attention, device)
        return models

    def models_of(self, pipe, noise_scheduler=None, base: dict | None = None) -> Models:
        """A StableDiffusionXLPipeline's parts by role."""
        encoders = torch.nn.ModuleDict(dict(zip(ENCODERS, (pipe.text_encoder, pipe.text_encoder_2))))
        return Models(denoiser=pipe.unet, encoder=encoders, autoencoder=pipe.vae,
                      tokenizers=dict(zip(TOKEN_INPUTS, (pipe.tokenizer, pipe.tokenizer_2))),
                      noise_scheduler=noise_scheduler, latent_scale=pipe.vae.config.scaling_factor, pipe=pipe,
                      base=base or {})

    def pipeline(self, models: Models, unet):
        pipe = models.pipe
        return pipe.__class__(**{**pipe.components, "unet": unet}, add_watermarker=False)

    def adapter_targets(self, unet, encoders, spec) -> AdapterTargets:
        return adapters.targets(unet, encoders, spec)  # kohya trains the same blocks on SDXL as on SD 1.x

    def encode_images(self, vae, images: torch.Tensor):
        return autoencoder.encode(vae, images)  # the same rule: SDXL's VAE makes NaNs in fp16 too

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(vae, latents)

    def encode_prompts(self, encoders, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = []
        for name, token_input in zip(ENCODERS, TOKEN_INPUTS):
            out = encoders[name](inputs[token_input], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
        conditioning = {"hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out.text_embeds}
        if all(k in inputs for k in SIZE_INPUTS):  # bucketing: each picture's own sizes and crop
            conditioning["time_ids"] = torch.cat([inputs[k] for k in SIZE_INPUTS], dim=-1)
        return conditioning

    def predict(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        time_ids = conditioning.get("time_ids")
        if time_ids is None:  # square pictures at `resolution`, uncropped: the latents' own size says it
            time_ids = square_time_ids(noisy)
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids.to(noisy.device, noisy.dtype)}
        return unet(noisy, timesteps, conditioning["hidden_states"], added_cond_kwargs=added).sample


def square_time_ids(latents: torch.Tensor) -> torch.Tensor:
    """(original size, crop top-left, target size) of pictures made at the latents' size, [N, 6]:
    (resolution, resolution), (0, 0), (resolution, resolution) when bucketing is off."""
    height, width = (side * LATENT_FACTOR for side in latents.shape[-2:])
    return torch.tensor([height, width, 0, 0, height, width], dtype=latents.dtype,
                        device=latents.device).expand(latents.shape[0], 6)


def set_up(models: Models, config, weight_dtype: torch.dtype) -> None:
    """The parts made ready to train, in place (as dbnb.family.sd1.family.set_up): frozen parts in
    the mixed-precision dtype, the VAE aside; the trained UNet in fp32, or adapters in fp32."""
    from dbnb.family import lora  # lazy: peft, only where adapters are added

    unet, encoders = models.denoiser, models.encoder
    models.autoencoder.requires_grad_(False)
    encoders.requires_grad_(False)
    if weight_dtype != torch.float32:
        encoders.to(dtype=weight_dtype)
        if config.use_lora:
            unet.to(dtype=weight_dtype)
    if config.use_lora:
        lora.add_adapters(unet, encoders, lora.Spec.from_config(config), SDXL, seed=config.seed)
    checkpoint_gradients(unet, list(encoders.values()), config)


SDXL = SDXLFamily()
