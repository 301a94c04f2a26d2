"""The presets: the seed guide's character setup (GUIDE_CHARACTER) and the extension's Person / Object-Style buttons."""
from __future__ import annotations

from dbnb.core.config.declare import QUALITY_NEGATIVE

# The seed guide's character setup: what its Person button and its walkthrough fill in, with the
# values its readers then type (Train Model → Person; Instance prompt "nanU Unan", Class Prompt "Unan";
# transparent class images, 10x the pictures; LR 0.000001; warmup 15; polynomial; flip off; 12 GB
# memory savers). The one source of "the guide's setup": `--preset person` on the command line,
# `dbnb config --preset person`, the training report's comparison, and the notebooks' parameter
# defaults (a test holds each notebook's parameters cell to it). A preset is data: it never depends
# on what this machine has installed. README "From the guide to dbnb" says where dbnb differs.
GUIDE_CHARACTER = {
    # Prompts: a rare name and its reversal (the guide's "nanU Unan"), never a word users type anyway.
    "instance_token": "nanU", "class_token": "Unan", "instance_prompt": "nanU Unan", "class_prompt": "Unan",
    # Class images: fully transparent, 10x the instance pictures (num_class_images 0 means that).
    "with_prior_preservation": True, "class_images_mode": "transparent", "num_class_images": 0,
    "class_data_dir": "class_images", "class_guidance_scale": 12.0, "class_infer_steps": 28,
    "class_negative_prompt": QUALITY_NEGATIVE,
    # Intervals and learning rate.
    "max_train_steps": 3000, "save_every_steps": 500, "sample_every_steps": 0,
    "learning_rate": 1e-6, "lr_scheduler": "polynomial", "lr_warmup_steps": 15, "train_text_encoder": True,
    # Image processing and the 12 GB card's memory savers.
    "resolution": 512, "center_crop": False, "hflip": False,
    "mixed_precision": "fp16", "use_8bit_adam": True, "gradient_checkpointing": True, "use_ema": False,
}

# The guide's two presets (the extension's "Person" and "Object/Style" buttons).
PRESETS = {
    "person": dict(GUIDE_CHARACTER),
    "object_style": {"learning_rate": 2e-6, "hflip": True, "with_prior_preservation": False,
                     "remove_background": False, "prune_core_tags": False},
}

# What a base model's family changes in the defaults: the one place per-family defaults are kept
# (SD 1.x's are the Config's own). The notebooks apply them (dbnb.faces.notebook.family_defaults):
# `resolution` where notebook 02's cell says 0, "the base model's own size"; `use_lora` where
# no GPU has the memory a whole fine-tune of that family needs (FULL_FINE_TUNE_GIB), since
# there only adapters fit.
FAMILY_DEFAULTS = {"sd1": {"resolution": 512}, "sdxl": {"resolution": 1024, "use_lora": True}}
FULL_FINE_TUNE_GIB = {"sdxl": 39.0}  # a "40 GB" A100 reports 39.4 GiB
