"""The one config: every setting dbnb reads, with its default, help and the name users know.

`Config` is a frozen dataclass. The CLI's `key=value`, the notebooks' parameters cell, the
ipywidgets form and each run's `config.json` are views of it; nothing else holds a setting.
Names follow diffusers' `train_dreambooth.py` where it has one; `label` is the name in the
AUTOMATIC1111 Dreambooth extension (what the seed's users look for), `section` the
extension's tab group.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dbnb.errors import DbnbError

# The seed's "汎用ネガ" (generic quality negative), used for class images and previews.
QUALITY_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                    "fewer digits, cropped, worst quality, low quality, normal quality, "
                    "jpeg artifacts, signature, watermark, blurry")

SECTIONS = ("Model", "Directories", "Dataset", "Prompts", "Class Images", "Intervals", "Learning Rate",
            "Image Processing", "Tuning", "Gradients", "Samples", "Test Prompts")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine",
                 "cosine_with_restarts", "polynomial")


class ConfigError(DbnbError, ValueError):
    """A setting is wrong. The message names each field and says how to fix it."""


def setting(default, section: str, label: str, help: str, choices: tuple = (), help_ja: str = ""):
    """One setting. `label` is the webui extension's name; `help` (English) and `help_ja`
    (Japanese, for the seed's readers) are shown under the field in the form and in
    `dbnb config --list`."""
    assert section in SECTIONS, section
    return field(default=default, metadata=dict(section=section, label=label, help=help,
                                                 help_ja=help_ja, choices=choices))


@dataclass(frozen=True)
class Config:
    # --- Model ---------------------------------------------------------------------------
    pretrained_model_name_or_path: str = setting(
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "Model", "Source Checkpoint",
        "Base model: a diffusers folder, a Hugging Face repo id, a single .safetensors/.ckpt "
        "file, an https:// URL or a Google Drive link. A merged model is fine.")
    revision: str = setting("", "Model", "Revision",
                            "Hub revision (branch, tag or commit) when the base model is a repo id.")
    pretrained_vae_name_or_path: str = setting(
        "", "Model", "Pretrained VAE Name or Path",
        "Optional separate VAE (folder, repo id or file). Empty: the base model's own VAE.")

    # --- Directories ---------------------------------------------------------------------
    instance_data_dir: str = setting("", "Directories", "Dataset Directory",
                                     "Folder with the character's training images (+ optional .txt captions).")
    class_data_dir: str = setting("", "Directories", "Classification Dataset Directory",
                                  "Folder with the class (regularization) images.")
    output_dir: str = setting("dbnb-runs", "Directories", "Model Directory",
                              "Where run folders are written. On Colab put it on Drive so a lost session loses nothing.")
    run_name: str = setting("run", "Directories", "Name",
                            "The run folder's name under output_dir; also the exported file's name.")
    concepts_list: str = setting("", "Directories", "Concepts List",
                                 "Optional JSON file listing several concepts (instance_data_dir, instance_prompt, "
                                 "class_data_dir, class_prompt each). Replaces the single-concept fields.")

    # --- Dataset -------------------------------------------------------------------------
    dataset_source: str = setting("", "Dataset", "Source Images",
                                  "Folder, .zip, Google Drive link or URL list (.txt) of the original pictures; "
                                  "`dbnb prep` writes the prepared set to instance_data_dir.")
    remove_background: bool = setting(True, "Dataset", "Remove Background",
                                      "Cut the character out with anime-segmentation and put it on background_color "
                                      "(the seed: clutter and backgrounds get learnt too).")
    segmentation_model: str = setting("skytnt/anime-seg", "Dataset", "Segmentation Model",
                                      "anime-segmentation ONNX model: a Hub repo holding isnetis.onnx, or a local .onnx file.")
    square_mode: str = setting("pad", "Dataset", "Make Square",
                               "pad: whole picture on a square of background_color (no straight-cut bands; the seed's "
                               "advice). center: center crop. face: crop around the detected face.",
                               choices=("pad", "center", "face"))
    extra_framings: bool = setting(False, "Dataset", "Add Bust-up / Cowboy-shot Crops",
                                   "Also derive bust-up and cowboy-shot crops from full-body pictures (the seed's "
                                   "花月 workflow). Face-only close-ups are never made: the seed found they hurt.")
    caption_template: str = setting("[instance_token] [class_token]", "Dataset", "Caption Template",
                                    "Text written to each image's .txt for [filewords]; [instance_token] and "
                                    "[class_token] are filled in, add tags after them.")

    # --- Prompts -------------------------------------------------------------------------
    instance_prompt: str = setting("", "Prompts", "Instance Prompt",
                                   "Prompt that calls the character, e.g. 'nanU Unan' (the seed: a rare word pair). "
                                   "May contain [filewords].")
    class_prompt: str = setting("", "Prompts", "Class Prompt",
                                "Prompt of the class images, e.g. 'Unan' or '1girl'. May contain [filewords].")
    instance_token: str = setting("", "Prompts", "Instance Token",
                                  "With [filewords]: the character's token, inserted into captions that lack it.")
    class_token: str = setting("", "Prompts", "Class Token",
                               "With [filewords]: the class word that the instance token is put in front of.")

    # --- Class Images --------------------------------------------------------------------
    with_prior_preservation: bool = setting(
        False, "Class Images", "Use Class Images (prior preservation)",
        "Train on class images beside the instance images so the class word keeps its meaning.")
    num_class_images: int = setting(0, "Class Images", "Total Number of Class/Reg Images",
                                    "How many class images to use. Must not exceed what the class folder holds "
                                    "(the seed warns: make it match the folder).")
    prior_loss_weight: float = setting(1.0, "Class Images", "Prior Loss Weight",
                                       "Weight of the class-image loss against the instance loss.")
    class_negative_prompt: str = setting(QUALITY_NEGATIVE, "Class Images", "Classification Image Negative Prompt",
                                         "Negative prompt when generating class images.")
    class_guidance_scale: float = setting(12.0, "Class Images", "Classification CFG Scale",
                                          "CFG scale when generating class images (the seed: 12).")
    class_infer_steps: int = setting(28, "Class Images", "Classification Steps",
                                     "Sampling steps when generating class images (the seed: 28).")
    class_images_mode: str = setting(
        "generate", "Class Images", "Class Image Source",
        "generate: with the base model and class_prompt. transparent: fully transparent PNGs, the seed "
        "community's trick; the trainer puts them on background_color (white), so they train as plain "
        "white images (the old extension dropped alpha: there they were black; set background_color=black "
        "to reproduce that). black: opaque black images, the old extension's result for the class images "
        "only. import: copy from class_images_import.",
        choices=("generate", "transparent", "black", "import"))
    class_images_import: str = setting("", "Class Images", "Import Class Images From",
                                       "Folder, .zip or Google Drive link to copy class images from (mode import).")
    class_sampler: str = setting("dpmpp_2m", "Class Images", "Classification Sampler",
                                 "Sampler for generated class images.", choices=("ddim", "euler_a", "dpmpp_2m"))
    class_seed: int = setting(0, "Class Images", "Classification Seed",
                              "Seed of class image k is class_seed + k, so a rerun regenerates the same images.")
    class_batch_size: int = setting(0, "Class Images", "Class Image Batch Size",
                                    "Images generated at once; 0 picks it from free VRAM.")

    # --- Intervals -----------------------------------------------------------------------
    max_train_steps: int = setting(3000, "Intervals", "Training Steps",
                                   "Total optimizer steps. The seed: ~3000 for 3 images, 7000 for 5, "
                                   "10000-20000 for 40-100 images with detailed outfits.")
    num_train_epochs: int = setting(0, "Intervals", "Training Epochs",
                                    "If > 0, train this many epochs instead of max_train_steps.")
    save_every_steps: int = setting(500, "Intervals", "Save Checkpoint Frequency",
                                    "Save trained weights + resume state every N steps (0: only at the end). "
                                    "The seed: 500 is enough; small values fill the disk.")
    sample_every_steps: int = setting(0, "Intervals", "Save Preview(s) Frequency",
                                      "Write preview images every N steps (0: never; the seed turns it off on 12 GB cards).")
    keep_last_n: int = setting(2, "Intervals", "Keep Last N Resume States",
                               "Resume states (optimizer etc., large) older than the last N are deleted; "
                               "trained weights are kept.")

    # --- Learning Rate -------------------------------------------------------------------
    learning_rate: float = setting(1e-6, "Learning Rate", "Learning Rate",
                                   "UNet learning rate. The seed: 1e-6 whatever the number of images.")
    scale_lr: bool = setting(False, "Learning Rate", "Scale Learning Rate",
                             "Multiply the learning rate by batch size x gradient accumulation x GPUs "
                             "(diffusers' meaning). It does NOT lower the LR as training goes on; "
                             "the scheduler does that.")
    lr_scheduler: str = setting("polynomial", "Learning Rate", "Learning Rate Scheduler",
                                "LR schedule after warmup. The extension's default is polynomial.",
                                choices=LR_SCHEDULERS)
    lr_warmup_steps: int = setting(15, "Learning Rate", "Learning Rate Warmup Steps",
                                   "Steps with the LR rising from 0 (the seed: about 15).")
    lr_power: float = setting(1.0, "Learning Rate", "Polynomial Power",
                              "Power of the polynomial schedule (1.0: linear decay).")
    lr_num_cycles: int = setting(1, "Learning Rate", "Cosine Restarts",
                                 "Number of restarts for cosine_with_restarts.")
    train_text_encoder: bool = setting(False, "Learning Rate", "Train Text Encoder",
                                       "Also fine-tune the CLIP text encoder (more VRAM, stronger likeness).")
    text_encoder_lr: float = setting(1e-6, "Learning Rate", "Text Encoder Learning Rate",
                                     "Learning rate of the text encoder when it is trained.")
    stop_text_encoder: float = setting(1.0, "Learning Rate", "Step Ratio of Text Encoder Training",
                                       "Fraction of the run (0-1) after which the text encoder is frozen.")

    # --- Image Processing ----------------------------------------------------------------
    resolution: int = setting(512, "Image Processing", "Resolution",
                              "Training size in pixels (multiple of 8). SD 1.x: 512.")
    center_crop: bool = setting(False, "Image Processing", "Center Crop",
                                "Crop the center square instead of resizing the whole image.")
    hflip: bool = setting(False, "Image Processing", "Apply Horizontal Flip",
                          "Randomly mirror images. Off by default: the seed found it mixes the left and right "
                          "colours of asymmetric designs.")
    background_color: str = setting("white", "Image Processing", "Background Colour",
                                    "Colour that transparent pixels are put on (name or #rrggbb). "
                                    "Transparent class images become this colour.")
    skip_bad_images: bool = setting(
        False, "Image Processing", "Skip Unreadable Images",
        "Train without pictures that cannot be read (damaged, truncated, not a picture), with a warning "
        "naming each. Off: such a picture stops training before the model loads.",
        help_ja="読み込めない画像（破損・途中で切れたファイル・画像でないもの）を警告付きで除いて学習します。"
                "オフなら、そのような画像があるとモデルを読み込む前に学習を止めます。")

    # --- Tuning --------------------------------------------------------------------------
    train_batch_size: int = setting(1, "Tuning", "Batch Size", "Images per step (per GPU).")
    mixed_precision: str = setting("fp16", "Tuning", "Mixed Precision",
                                   "fp16 (T4 / most Colab GPUs), bf16 (A100/H100) or no (CPU). "
                                   "Weights stay fp32 either way.", choices=("no", "fp16", "bf16"))
    use_8bit_adam: bool = setting(True, "Tuning", "Use 8bit Adam",
                                  "bitsandbytes' 8-bit AdamW: much less VRAM. Falls back to torch AdamW "
                                  "with a warning where bitsandbytes does not work.")
    adam_beta1: float = setting(0.9, "Tuning", "Adam Beta 1", "AdamW beta1.")
    adam_beta2: float = setting(0.999, "Tuning", "Adam Beta 2", "AdamW beta2.")
    adam_weight_decay: float = setting(1e-2, "Tuning", "Adam Weight Decay", "AdamW weight decay.")
    adam_epsilon: float = setting(1e-8, "Tuning", "Adam Epsilon", "AdamW epsilon.")
    attention: str = setting("sdpa", "Tuning", "Memory Attention",
                             "sdpa: PyTorch's built-in fused attention (no extra install). "
                             "xformers: when it is installed and works on this GPU.",
                             choices=("sdpa", "xformers"))
    cache_latents: bool = setting(True, "Tuning", "Cache Latents",
                                  "Encode the images with the VAE once, before training (faster, less VRAM). "
                                  "The extension's 'Don't Cache Latents' is the opposite switch.")
    use_ema: bool = setting(False, "Tuning", "Train EMA",
                            "Keep an exponential moving average of the UNet, saved beside the raw weights.")
    ema_decay: float = setting(0.9999, "Tuning", "EMA Decay", "Decay of the EMA weights.")
    offset_noise: float = setting(0.0, "Tuning", "Offset Noise",
                                  "Add per-channel noise offset (e.g. 0.05) for darker darks / brighter brights. 0: off.")
    snr_gamma: float = setting(0.0, "Tuning", "Min-SNR Gamma",
                               "Min-SNR loss weighting (e.g. 5.0). 0: off.")
    seed: int = setting(1234, "Tuning", "Seed", "Random seed of the run (data order, noise).")

    # --- Gradients -----------------------------------------------------------------------
    gradient_accumulation_steps: int = setting(1, "Gradients", "Gradient Accumulation Steps",
                                               "Average gradients over N batches per optimizer step.")
    gradient_checkpointing: bool = setting(True, "Gradients", "Gradient Checkpointing",
                                           "Recompute activations in backward: less VRAM, ~20% slower.")
    max_grad_norm: float = setting(1.0, "Gradients", "Max Grad Norms",
                                   "Clip the gradient norm to this value (0: no clipping).")
    optimizer_in_backward: bool = setting(
        False, "Gradients", "Optimizer in Backward",
        "Step each weight as soon as backward has its gradient, then free that gradient, so the UNet's "
        "full-size gradients (~3.4 GB fp32 for SD 1.5) never exist all at once. Same update as the normal "
        "path. Needs gradient_accumulation_steps=1, max_grad_norm=0, one GPU and mixed_precision bf16 or no "
        "(not fp16).")

    # --- Samples -------------------------------------------------------------------------
    sample_prompts: tuple[str, ...] = setting((), "Samples", "Sample Image Prompt",
                                              "Preview prompts. Empty: the instance prompt.")
    sample_negative_prompt: str = setting(QUALITY_NEGATIVE, "Samples", "Sample Negative Prompt",
                                          "Negative prompt of the previews.")
    num_samples: int = setting(2, "Samples", "Number of Samples to Generate",
                               "Preview images per prompt (keep it small: each costs a full generation).")
    sample_seed: int = setting(42, "Samples", "Sample Seed", "Seed of the previews, fixed so steps compare.")
    sample_guidance_scale: float = setting(7.5, "Samples", "Sample CFG Scale", "CFG scale of the previews.")
    sample_steps: int = setting(20, "Samples", "Sample Steps", "Sampling steps of the previews.")

    # --- Test Prompts --------------------------------------------------------------------
    # The seed's way to pick a checkpoint: first "<instance prompt>, 1girl, solo" until it looks
    # slightly overfit, then other clothes / places to see it is still flexible.
    test_fidelity_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo",), "Test Prompts", "Fidelity Prompts",
        "Prompts that should show the character as trained; {instance_prompt} and {class_prompt} are filled in.")
    test_flexibility_prompts: tuple[str, ...] = setting(
        ("{instance_prompt}, 1girl, solo, school uniform, classroom",
         "{instance_prompt}, 1girl, solo, swimsuit, beach",
         "{instance_prompt}, 1girl, solo, winter coat, snowy street"), "Test Prompts", "Flexibility Prompts",
        "Prompts that ask for other clothes / places: a good checkpoint follows them.")
    test_negative_prompt: str = setting(QUALITY_NEGATIVE, "Test Prompts", "Test Negative Prompt",
                                        "Negative prompt of the test images (the seed's quality negative).")
    test_class_prompt_in_negative: bool = setting(
        False, "Test Prompts", "Class Prompt in Negative",
        "Also put the class prompt in the negative (the seed's 'Instance prompt + Class prompt ネガ' call).")
    test_seeds: int = setting(4, "Test Prompts", "Seeds per Prompt", "Images per prompt and checkpoint (seeds 0..N-1).")
    test_steps: str = setting("all", "Test Prompts", "Checkpoints to Test",
                              "'all', or step numbers like '1000,2000,3000'. The base model is always a baseline row.")
    test_guidance_scale: float = setting(7.5, "Test Prompts", "Test CFG Scale", "CFG scale of the test images.")
    test_infer_steps: int = setting(28, "Test Prompts", "Test Sampling Steps", "Sampling steps of the test images.")
    clip_model: str = setting("openai/clip-vit-base-patch32", "Test Prompts", "CLIP Model",
                              "CLIP for CLIP-I / CLIP-T scores (Hub id or local folder).")
    dino_model: str = setting("facebook/dino-vits16", "Test Prompts", "DINO Model",
                              "DINO ViT for the DINO fidelity score (Hub id or local folder).")
    score_with: str = setting(
        "clip", "Test Prompts", "Score With",
        "clip: CLIP-I / DINO / CLIP-T (any model). world: pixel analysis of dbnb's tiny world (the demo "
        "model): identity, swapped sides, copied poses, hair following the prompt, class drift.",
        choices=("clip", "world"))
    flexibility_tolerance: float = setting(
        0.01, "Test Prompts", "Flexibility Tolerance",
        "The recommended checkpoint is the most faithful one whose CLIP-T is within this of the best.")

    def __post_init__(self):
        problems = [p for f in dataclasses.fields(self) for p in _type_problems(f, getattr(self, f.name))]
        if not problems:
            problems = _value_problems(self)
        if problems:
            raise ConfigError("Invalid dbnb config:\n  - " + "\n  - ".join(problems))

    # --- views -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "Config":
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.to_dict()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        else:
            text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        path.write_text(text, encoding="utf-8")
        return path


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# Keys a run folder adds to its config.json beside the settings (dbnb.checkpoints writes
# them). Reading a config file drops them, so a run's config.json can start another run.
RUN_KEYS = ("run_id",)

# The seed's two presets (the extension's "Person" and "Object/Style" buttons). Only what
# differs from the defaults, which already are the seed's character settings.
PRESETS = {
    "person": {},
    "object_style": {"learning_rate": 2e-6, "hflip": True, "with_prior_preservation": False,
                     "remove_background": False},
}


def _type_problems(f: dataclasses.Field, value) -> list[str]:
    kind = _field_type(f)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        tuple: isinstance(value, tuple) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        want = {tuple: "a list of strings"}.get(kind, kind.__name__)
        return [f"{f.name}: expected {want}, got {value!r} ({type(value).__name__})."]
    choices = f.metadata["choices"]
    if choices and value not in choices:
        return [f"{f.name}: {value!r} is not one of {', '.join(choices)}."]
    return []


def _value_problems(c: Config) -> list[str]:
    p = []
    if c.resolution <= 0 or c.resolution % 8:
        p.append(f"resolution: {c.resolution} must be a positive multiple of 8 (SD 1.x: 512).")
    if c.max_train_steps <= 0 and c.num_train_epochs <= 0:
        p.append(f"max_train_steps: {c.max_train_steps} must be > 0 (or set num_train_epochs > 0).")
    for name in ("learning_rate", "text_encoder_lr"):
        if getattr(c, name) <= 0:
            p.append(f"{name}: {getattr(c, name)} must be > 0 (the seed uses 1e-6).")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_samples", "sample_steps",
                 "class_infer_steps", "lr_num_cycles", "test_seeds", "test_infer_steps"):
        if getattr(c, name) < 1:
            p.append(f"{name}: {getattr(c, name)} must be at least 1.")
    for name in ("num_train_epochs", "save_every_steps", "sample_every_steps", "lr_warmup_steps",
                 "num_class_images", "max_grad_norm", "offset_noise", "snr_gamma", "prior_loss_weight",
                 "class_batch_size", "class_seed", "flexibility_tolerance"):
        if getattr(c, name) < 0:
            p.append(f"{name}: {getattr(c, name)} must not be negative.")
    if c.keep_last_n < 1:
        p.append(f"keep_last_n: {c.keep_last_n} must be at least 1 (the last state is what resume needs).")
    if not 0.0 <= c.stop_text_encoder <= 1.0:
        p.append(f"stop_text_encoder: {c.stop_text_encoder} is a fraction of the run; use 0 to 1.")
    if not 0.0 < c.ema_decay < 1.0:
        p.append(f"ema_decay: {c.ema_decay} must be between 0 and 1 (e.g. 0.9999).")
    if c.with_prior_preservation and not c.concepts_list:
        if not c.class_prompt:
            p.append("with_prior_preservation is on but class_prompt is empty: set class_prompt "
                     "(e.g. 'Unan' or '1girl') or turn with_prior_preservation off.")
        if not c.class_data_dir:
            p.append("with_prior_preservation is on but class_data_dir is empty: set the class image "
                     "folder or turn with_prior_preservation off.")
        if c.num_class_images < 1:
            p.append("with_prior_preservation is on but num_class_images is 0: set how many class "
                     "images to use (the seed: 10x the instance images).")
    if not c.pretrained_model_name_or_path:
        p.append("pretrained_model_name_or_path is empty: name the base model (folder, repo id, file or URL).")
    if not c.run_name.strip() or c.run_name.strip() in (".", "..") or any(ch in c.run_name for ch in "/\\"):
        p.append(f"run_name: {c.run_name!r} must be a plain folder name (no '/', '..' or absolute path; not "
                 "empty): the run folder is output_dir/run_name, so put the path in output_dir.")
    for name in ("instance_prompt", "class_prompt", "instance_token", "class_token"):
        value = getattr(c, name)
        if value and not value.strip():
            p.append(f"{name}: {value!r} is only spaces; set the words (or leave it empty).")
    return p


def _field_type(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(Config)[f.name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    if origin in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def from_dict(data: dict, source: str = "config") -> Config:
    """Build a Config from plain data (JSON / YAML). Unknown keys are an error, not ignored."""
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"Unknown setting(s) in {source}: {', '.join(hints)}. "
                          "`dbnb config --list` shows every setting.")
    return Config(**{k: _normalize(_field_type(FIELDS[k]), v) for k, v in data.items()})


def _normalize(kind: type, value):
    """The few lossless readings JSON / YAML need; anything else is left for validation."""
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    if kind is tuple and isinstance(value, str):
        return (value,)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:  # PyYAML reads 1e-6 (no dot) as a string
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, object]:
    """`key=value` from the command line, the value read as YAML (so 1e-6, true, [a, b] work)."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Override {text!r} is not key=value (e.g. learning_rate=1e-6).")
    if key not in FIELDS:
        from_dict({key: None}, source="the command line")  # raises with a suggestion
    kind = _field_type(FIELDS[key])
    if kind is str:
        return key, raw
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot read {raw!r} ({e}).") from None
    return key, value


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                preset: str | None = None) -> Config:
    """Defaults ← preset ← file ← `key=value` overrides, validated once at the end."""
    data: dict = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
        data.update(PRESETS[preset])
    if path:
        data.update(read_config_file(path))
    for item in overrides:
        key, value = parse_override(item)
        data[key] = value
    return from_dict(data, source=str(path) if path else "config")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. `dbnb config --preset person > {path.name}` writes one.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 — parser errors differ by format; the message says which file
        raise ConfigError(f"Cannot read config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of setting: value, not {type(data).__name__}.")
    return {k: v for k, v in data.items() if k not in RUN_KEYS}


def load_workspace(folder: str | Path, namespace: dict | None = None) -> Config:
    """The notebooks' shared config, `<folder>/config.yaml`, updated with the variables of
    `namespace` that are settings (a notebook passes `globals()`, so its parameters cell's
    names are the settings' names) and saved back for the next notebook."""
    path = Path(folder) / "config.yaml"
    data = read_config_file(path) if path.is_file() else {}
    data.update({k: v for k, v in (namespace or {}).items() if k in FIELDS})
    config = from_dict(data, source=str(path))
    config.save(path)
    return config


def section_fields(section: str) -> list[str]:
    """The settings of one section, in order (for a notebook that handles one step)."""
    assert section in SECTIONS, section
    return [f.name for f in dataclasses.fields(Config) if f.metadata["section"] == section]


def as_overrides(config: Config, names: typing.Iterable[str]) -> list[str]:
    """`key=value` strings that `load_config(..., overrides)` reads back to these values."""
    out = []
    for name in names:
        value = getattr(config, name)
        text = value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)
        out.append(f"{name}={text}")
    return out


def describe() -> list[dict]:
    """One row per setting, in order: for forms, `#@param` cells and the README table."""
    return [dict(name=f.name, default=f.default, type=_field_type(f).__name__, **f.metadata)
            for f in dataclasses.fields(Config)]
