"""SDXL as a model family (dbnb.family.base.Family): two CLIP text encoders (CLIP-L, OpenCLIP
bigG) whose penultimate hidden states, side by side, condition the UNet, with text_encoder_2's
pooled projection and the size / crop time ids as its added conditioning; the VAE in fp32.

The encoder role is both text encoders in one ModuleDict under kohya's names for them (`te1`,
`te2`), so their adapters and checkpoint keys say which is which. Fine-tuned whole (full DreamBooth,
train_text_encoder), both learn, each saved as its own transformers folder (dbnb.run.checkpoints).
The conditioning follows diffusers' train_dreambooth_lora_sdxl.py (encode_prompt, compute_time_ids).
"""
from __future__ import annotations

import torch

from dbnb.core.errors import DbnbError
from dbnb.family.base import SIZE_INPUTS, AdapterTargets, Card, Models, Part, Parts, resolve_clip_skip
from dbnb.family.sd1 import adapters, autoencoder
from dbnb.family.sd1.family import set_attention
from dbnb.family.sd1.family import set_up as sd1_set_up
from dbnb.family.sdxl import load
from dbnb.family.sdxl.webui import SDXLFile

ENCODERS = ("te1", "te2")   # text_encoder (CLIP-L), text_encoder_2 (bigG, with the pooled projection)
TOKEN_INPUTS = ("input_ids", "input_ids_2")  # one per tokenizer, the batches' token inputs
LATENT_FACTOR = 8  # every SDXL VAE halves the picture three times: a latent pixel is 8x8 pixels


class SDXLError(DbnbError, ValueError):
    """A setting that does not fit an SDXL base; the message says what to set instead."""


class SDXLFamily:
    name = "sdxl"
    parts = Parts(denoiser=Part("unet", "UNet", "diffusion_pytorch_model.safetensors", kohya="lora_unet_"),
                  # kohya's lora_te1_ / lora_te2_: its "lora_" and the encoders' own names (ENCODERS)
                  encoder=Part("text_encoders", "text encoders", "model.safetensors", kohya="lora_", members=ENCODERS))
    # SDXL 1.0's licence; Pony, Illustrious and NoobAI have their own, which the user puts on the card
    card = Card("Stable Diffusion XL", "SDXL", "openrail++",
                ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"))
    kohya_version = "sdxl_base_v1-0"  # sd-scripts' sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0
    # Conditioned on the penultimate layers, as SDXL was trained: what "clip skip 2" means for Pony
    # and Illustrious. The webui (unless sdxl_clip_l_skip) and kohya's sdxl_train ignore clip skip
    # for SDXL, so a LoRA trained on another layer would be rendered on this one: refused.
    clip_skip = 2
    clip_skips = range(2, 3)
    single_file = SDXLFile()  # the original (sgm) layout the webui and ComfyUI load

    def recognizes(self, source: str) -> bool:
        return load.is_sdxl(source)

    def open(self, source: str, *, autoencoder: str = "", revision: str = "",
             dtype: torch.dtype | None = None) -> Models:
        return self.models_of(load.load_pipeline(source, vae=autoencoder, revision=revision, dtype=dtype))

    def load(self, config, device: torch.device, weight_dtype: torch.dtype) -> Models:
        from diffusers import DDPMScheduler

        from dbnb.family.sd1.load import fingerprint

        resolve_clip_skip(self, config.clip_skip)  # a value it does not take: said before the model loads
        pipe = load.load_pipeline(config.pretrained_model_name_or_path, vae=config.pretrained_vae_name_or_path,
                                  revision=config.revision, dtype=load_dtypes(config, weight_dtype))
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

    def part_configs(self, source: str) -> dict[str, dict]:
        """The memory planner's: the parts' config files (what shapes them), by component."""
        from dbnb.family.sdxl import memory  # lazy: it imports this module

        return memory.part_configs(source)

    def empty_parts(self, config, weight_dtype: torch.dtype):
        """The memory planner's: the parts on the meta device, set up to train (dbnb.family.sdxl.memory)."""
        from dbnb.family.sdxl import memory  # lazy: it imports this module

        return memory.empty_parts(config, weight_dtype)

    def memory_rules(self):
        """The planner's and memory_profile=auto's SDXL rules (dbnb.family.sdxl.memory: auto_settings,
        refusal, load_ram)."""
        from dbnb.family.sdxl import memory  # lazy: it imports this module

        return memory

    def encode_images(self, vae, images: torch.Tensor):
        return autoencoder.encode(vae, images)  # the same rule: SDXL's VAE makes NaNs in fp16 too

    def decode_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return autoencoder.decode(vae, latents)

    def encode_prompts(self, encoders, inputs: dict[str, torch.Tensor], clip_skip: int = 0) -> dict[str, torch.Tensor]:
        resolve_clip_skip(self, clip_skip)  # the penultimate layer is the only one taken
        hidden = []
        for name, token_input in zip(ENCODERS, TOKEN_INPUTS):
            out = encoders[name](inputs[token_input], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
        return {"hidden_states": torch.cat(hidden, dim=-1), "text_embeds": out.text_embeds,
                **self.size_conditioning(inputs)}

    def size_conditioning(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The time ids of the batch's size inputs (bucketing: each picture's own sizes and crop); none
        without them (predict then takes the square ones)."""
        if not all(k in inputs for k in SIZE_INPUTS):
            return {}
        return {"time_ids": torch.cat([inputs[k] for k in SIZE_INPUTS], dim=-1)}

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


def load_dtypes(config, weight_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each part is read in: a full-size SDXL read in fp32 is 13 GiB of system RAM, over a
    free Colab's 12.7 GB (bench/bench_sdxl_ram.py), so the parts set_up freezes in half precision are
    read in fp16 — under bf16 too, which set_up casts to on the device: the base's fingerprint
    (taken as loaded) then stays the same whichever half precision a resumed run's GPU has."""
    if weight_dtype == torch.float32:
        return {"default": torch.float32}
    # The VAE runs in fp32 (dbnb.family.sd1.autoencoder); a fully trained UNet (and fine-tuned
    # encoders) keep fp32 master weights.
    encoders = torch.float32 if config.fine_tunes_text_encoder else torch.float16
    return {"default": torch.float16, "vae": autoencoder.DTYPE,
            "unet": torch.float16 if config.use_lora else torch.float32,
            "text_encoder": encoders, "text_encoder_2": encoders}


def set_up(models: Models, config, weight_dtype: torch.dtype) -> None:
    """The parts made ready to train, in place, as SD 1.x's are (frozen parts in the mixed-precision
    dtype, the VAE aside; trained ones, or adapters, in fp32), both encoders alike."""
    sd1_set_up(models.denoiser, models.encoder, models.autoencoder, config, weight_dtype, family=SDXL,
               members=list(models.encoder.values()))


SDXL = SDXLFamily()
