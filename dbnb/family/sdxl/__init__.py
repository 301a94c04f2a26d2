"""SDXL and its anime descendants (Illustrious, NoobAI, Pony, Animagine): two CLIP text encoders with a pooled embedding, size / crop time ids, the VAE in fp32; loaded from diffusers folders."""
