"""Problems with a config: each value's type and limits, the settings checked together, and the warnings and checks the trainer runs before its first step."""
from __future__ import annotations

import dataclasses
import typing
import warnings

from dbnb.core.config.declare import ConfigError

if typing.TYPE_CHECKING:
    from dbnb.core.config.whole import Config


def type_problems(f: dataclasses.Field, value, kind: type) -> list[str]:
    """The value is not of the field's type `kind`, or not one of its choices."""
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


def _limit_problems(c: Config, fields: typing.Iterable[dataclasses.Field]) -> list[str]:
    """Each field's own `minimum` / `above`."""
    p = []
    for f in fields:
        value, low, above = getattr(c, f.name), f.metadata["minimum"], f.metadata["above"]
        if low is not None and value < low:
            p.append(f"{f.name}: {value} must " + ("not be negative" if low == 0 else f"be at least {low}")
                     + f" (default {f.default}).")
        if above is not None and value <= above:
            p.append(f"{f.name}: {value} must be > {above} (default {f.default}).")
        if f.metadata["maximum"] is not None and value > f.metadata["maximum"]:
            p.append(f"{f.name}: {value} must be at most {f.metadata['maximum']} (default {f.default}).")
    return p


def value_problems(c: Config, fields: typing.Iterable[dataclasses.Field]) -> list[str]:
    """Each field's limits (`fields` in their order), then the settings checked together."""
    p = _limit_problems(c, fields)
    if c.resolution <= 0 or c.resolution % 8:
        p.append(f"resolution: {c.resolution} must be a positive multiple of 8 (SD 1.x: 512).")
    p += _bucket_problems(c)
    if c.max_train_steps <= 0 and c.num_train_epochs <= 0:
        p.append(f"max_train_steps: {c.max_train_steps} must be > 0 (or set num_train_epochs > 0).")
    p += _lora_problems(c)
    p += _inbackward_problems(c)
    p += _optimizer_problems(c)
    p += _text_cache_problems(c)
    if not 0.0 < c.ema_decay < 1.0:
        p.append(f"ema_decay: {c.ema_decay} must be between 0 and 1 (e.g. 0.9999).")
    if c.with_prior_preservation and not c.concepts_list:
        if not c.class_prompt:
            p.append("with_prior_preservation is on but class_prompt is empty: set class_prompt "
                     "(the guide: a throwaway word such as 'Unan', the reversal of the instance token 'nanU') "
                     "or turn with_prior_preservation off.")
        if not c.class_data_dir:
            p.append("with_prior_preservation is on but class_data_dir is empty: set the class image "
                     "folder or turn with_prior_preservation off.")
        if c.num_class_images < 1 and c.class_images_mode not in BLANK_CLASS_IMAGES:
            p.append("with_prior_preservation is on but num_class_images is 0 (only class_images_mode="
                     "transparent / black take 0 as 10x the instance images): set how many class images to use "
                     "(the seed: 10x the instance images).")
    if not c.pretrained_model_name_or_path:
        p.append("pretrained_model_name_or_path is empty: name the base model (folder, repo id, file or URL).")
    if not c.run_name.strip() or c.run_name.strip() in (".", "..") or any(ch in c.run_name for ch in "/\\"):
        p.append(f"run_name: {c.run_name!r} must be a plain folder name (no '/', '..' or absolute path; not "
                 "empty): the run folder is output_dir/run_name, so put the path in output_dir.")
    for name in ("instance_prompt", "class_prompt", "instance_token", "class_token"):
        value = getattr(c, name)
        if value and not value.strip():
            p.append(f"{name}: {value!r} is only spaces; set the words (or leave it empty).")
    return p + _link_problems(c)


# Folders dbnb reads or writes in place, which a link cannot be, and the setting that takes the
# link instead (a link here would otherwise become a local folder named "https:").
_FOLDER_NOT_LINK = {
    "instance_data_dir": "set dataset_source to the link and prepare the pictures into instance_data_dir "
                         "(notebook 02; CLI: dbnb prep LINK FOLDER)",
    "class_data_dir": "set class_images_mode=import and class_images_import to the link, which copies the "
                      "pictures into class_data_dir (notebook 03; CLI: dbnb classimages)",
    "output_dir": "set a folder on this machine (on Colab, one in Drive: /content/drive/MyDrive/...)",
}


def _link_problems(c: Config) -> list[str]:
    return [f"{name}: {getattr(c, name)!r} is a link, but it must be a folder on this machine: {fix}."
            for name, fix in _FOLDER_NOT_LINK.items()
            if getattr(c, name).strip().lower().startswith(("http://", "https://"))]


# class_images_mode values whose pictures are blank (one colour): they teach the class word "a plain
# picture", so it must be a word nobody prompts with (`class_word_warning`).
BLANK_CLASS_IMAGES = ("transparent", "black")
# Words people put in their prompts anyway (booru tags and plain English): as the class word of blank
# class images they would come to mean a plain picture. Compared per tag / word, lower case.
COMMON_CLASS_WORDS = frozenset({
    "girl", "1girl", "2girls", "multiple girls", "boy", "1boy", "2boys", "woman", "man", "person", "people",
    "human", "character", "female", "male", "lady", "child", "kid", "solo", "anime", "a girl", "a boy",
    "a woman", "a man", "a person", "a character", "1other"})


def class_word_warning(c: Config) -> str:
    """A warning (empty when none) for a common word as the class prompt of blank class images with
    prior preservation: the guide's "ここを仮にgirlにした場合、ふとgirlを使用したい場面が出た時に困ってしまう"
    — the run teaches that word to draw a plain picture. Checked at train start (not a ConfigError:
    someone may want exactly that)."""
    if not c.with_prior_preservation or c.class_images_mode not in BLANK_CLASS_IMAGES or c.concepts_list:
        return ""
    tags = [t.strip().strip("()[]{}").split(":")[0].strip().lower() for t in c.class_prompt.split(",")]
    common = [t for t in tags if t in COMMON_CLASS_WORDS or set(t.split()) & COMMON_CLASS_WORDS]
    if not common:
        return ""
    colour = "plain black" if c.class_images_mode == "black" else f"plain {c.background_color}"
    return (f"class_prompt {c.class_prompt!r} with class_images_mode={c.class_images_mode} and prior preservation: "
            f"the run teaches {', '.join(repr(t) for t in common)} to draw a {colour} picture, and every prompt "
            f"that uses it (the test prompts' '1girl, solo' too) is pulled towards that. The guide uses a throwaway "
            f"word instead: class_prompt=Unan with instance_prompt='nanU Unan' (a rare name and its reversal; in the "
            f"notebooks: class_token in 02). Set class_prompt (and instance_prompt) to such a word, or "
            f"class_images_mode=generate for real class pictures of {common[0]!r}. / クラスプロンプト "
            f"{c.class_prompt!r} が透過（無地）の正則化画像で学習され、{common[0]!r} が無地の絵を意味するようになります。"
            f"ガイドのように意味のない単語（例: nanU Unan の Unan）にしてください。")


def schedule_problems(c: Config, steps: int) -> tuple[list[str], list[str]]:
    """The LR schedule's settings checked together against the run's `steps`: (problems that
    would stop the run, ones that would only make it other than set), one line each with the fix.
    diffusers' schedules meet the first kind only at the last step (a division by zero), so the
    trainer checks before the first. Not part of a Config's own validation: a finished run's
    config must stay readable (export, sample) whatever it says."""
    fatal, odd = [], []
    said = (f"the run's {steps} steps (num_train_epochs={c.num_train_epochs})" if c.num_train_epochs > 0
            else f"max_train_steps={steps}")
    after_warmup = steps - c.lr_warmup_steps
    fix = f"Lower lr_warmup_steps below {steps} (a tenth of the run is usual) or train for more steps."
    if c.lr_scheduler == "polynomial" and after_warmup == 0:
        fatal.append(f"lr_warmup_steps={c.lr_warmup_steps} equals {said}: lr_scheduler=polynomial divides by the "
                     f"steps after the warm-up, none here, and the run would stop at its last step. {fix}")
    elif c.lr_scheduler != "constant" and after_warmup <= 0:
        odd.append(f"lr_warmup_steps={c.lr_warmup_steps} is not below {said}: the learning rate is still rising "
                   f"when the run ends and never reaches the one set. {fix}")
    elif c.lr_scheduler == "cosine_with_restarts" and c.lr_num_cycles > after_warmup:
        odd.append(f"lr_num_cycles={c.lr_num_cycles} with {after_warmup} steps after the warm-up "
                   f"(lr_warmup_steps={c.lr_warmup_steps}, {said}): a restart would come more often than once a "
                   f"step. Use at most {after_warmup} cycles (the extension's default: 1).")
    if c.lr_scheduler == "polynomial" and c.lr_power <= 0:
        fatal.append(f"lr_power={c.lr_power:g} with lr_scheduler=polynomial: the power must be > 0 (1.0: a straight "
                     "decay). 0 would keep the LR constant (use lr_scheduler=constant for that), a negative power "
                     "raises it without bound and divides by zero at the last step.")
    return fatal, odd


def check_schedule(c: Config, steps: int) -> None:
    """Before the first step: a ConfigError naming the settings for a schedule that would stop
    the run, a warning for one that would run other than set (see schedule_problems)."""
    fatal, odd = schedule_problems(c, steps)
    if fatal:
        raise ConfigError("The learning-rate schedule cannot run to the end:\n  - " + "\n  - ".join(fatal))
    for line in odd:
        warnings.warn(line, stacklevel=2)


# What optimizer_in_backward (dbnb.train.inbackward) cannot combine with, why, and what to change: it
# steps each weight inside backward, and these need every gradient after backward.
_INBACKWARD_WHY = {
    "gradient_accumulation_steps": (
        "gradients are consumed (stepped and freed) as backward produces them, so there is nothing "
        "to accumulate the next micro-batch into. Set gradient_accumulation_steps=1 (raise "
        "train_batch_size instead)"),
    "max_grad_norm": (
        "clipping by the global gradient norm needs every gradient at once, but the first weights are "
        "already stepped before the last gradients exist. Set max_grad_norm=0"),
    "mixed_precision": (
        "fp16 training needs the GradScaler, which unscales the gradients and skips the step on "
        "inf/NaN only after the whole backward; here every weight has already been stepped with "
        "its still-scaled gradient by then. Use mixed_precision=bf16 (A100, H100, L4, RTX 30xx+) "
        "or mixed_precision=no"),
}


def inbackward_conflicts(c: Config) -> list[str]:
    """One line per setting that optimizer_in_backward cannot honour (whether or not it is on)."""
    found = []
    if c.gradient_accumulation_steps > 1:
        found.append(f"gradient_accumulation_steps={c.gradient_accumulation_steps}: "
                     f"{_INBACKWARD_WHY['gradient_accumulation_steps']}.")
    if c.max_grad_norm > 0:
        found.append(f"max_grad_norm={c.max_grad_norm:g}: {_INBACKWARD_WHY['max_grad_norm']}.")
    # memory_profile=auto picks the precision at training; dbnb.train.memory refuses fp16 there
    if c.mixed_precision == "fp16" and c.memory_profile == "manual":
        found.append(f"mixed_precision=fp16: {_INBACKWARD_WHY['mixed_precision']}.")
    return found


def _inbackward_problems(c: Config) -> list[str]:
    if not c.optimizer_in_backward or not (found := inbackward_conflicts(c)):
        return []
    return ["optimizer_in_backward=true cannot be used with:\n    - " + "\n    - ".join(found)
            + "\n    Change these, or set optimizer_in_backward=false."]


def _lora_problems(c: Config) -> list[str]:
    p = []
    if not 0.0 <= c.lora_dropout < 1.0:
        p.append(f"lora_dropout: {c.lora_dropout} is a probability below 1; use 0 to 0.5 (0: off).")
    if not c.use_lora:
        return p
    if c.lora_rank < 1:
        p.append(f"lora_rank: {c.lora_rank} must be at least 1 with use_lora (the seed-style default is 32).")
    if c.optimizer_in_backward:
        p.append("use_lora with optimizer_in_backward: that saves the full UNet's gradients, which LoRA does not "
                 "have; set optimizer_in_backward=false.")
    return p


def _optimizer_problems(c: Config) -> list[str]:
    p = []
    if c.optimizer == "adamw8bit" and not c.use_8bit_adam:
        p.append("optimizer=adamw8bit with use_8bit_adam=false: the two disagree. For 8-bit AdamW set "
                 "use_8bit_adam=true (or optimizer=adamw, which follows use_8bit_adam); for torch's AdamW set "
                 "optimizer=adamw.")
    if c.optimizer == "prodigy":
        # Prodigy estimates the step size; its lr multiplies that estimate. AdamW-sized rates
        # (1e-4 … 1e-6) would leave the model where it started.
        # SDXL's second text encoder at 0 learns at the first's rate: only a rate of its own is checked
        second = (c.text_encoder_2_rate_setting,) if c.trains_text_encoder else ()
        low = [f"{name}={getattr(c, name):g}" for name in c.learning_rate_settings + second if 0 < getattr(c, name) < 0.1]
        if low:
            p.append(f"optimizer=prodigy with {', '.join(low)}: Prodigy finds its own step size and its "
                     "learning rate multiplies it; set " + " and ".join(f"{n.split('=')[0]}=1.0" for n in low)
                     + " (0.5 for a gentler run).")
        if c.optimizer_in_backward:
            p.append("optimizer=prodigy with optimizer_in_backward: Prodigy estimates one step size from all "
                     "weights together, which per-weight stepping cannot do; set optimizer_in_backward=false.")
    return p


def _text_cache_problems(c: Config) -> list[str]:
    """cache_text_embeddings encodes each prompt once, so the encoders must not learn and every
    prompt a step can make must be known before the first (dbnb.data.textcache)."""
    if not c.cache_text_embeddings:
        return []
    p = []
    if c.trains_text_encoder:
        learns = ("lora_text_encoder_rank", c.lora_text_encoder_rank) if c.use_lora else ("train_text_encoder", True)
        p.append(f"cache_text_embeddings=true with {learns[0]}={str(learns[1]).lower()}: the text encoder learns, "
                 "so its embeddings change every step and cannot be cached. Set "
                 + ("lora_text_encoder_rank=0" if c.use_lora else "train_text_encoder=false")
                 + " to train the UNet alone, or cache_text_embeddings=false.")
    varying = [f"{name}={value}" for name, value in (("shuffle_caption", "true"),
               ("caption_tag_dropout_rate", f"{c.caption_tag_dropout_rate:g}")) if getattr(c, name)]
    if varying:
        p.append(f"cache_text_embeddings=true with {' and '.join(varying)}: each step makes a new prompt (tags "
                 "shuffled or left out), too many to encode in advance. Set cache_text_embeddings=false, or "
                 "turn those off (caption_dropout_rate can stay: its empty prompt is cached too).")
    return p


def _bucket_problems(c: Config) -> list[str]:
    """Bucket sides are whole latents, the range holds the square of the resolution, and pictures
    prep leaves unsquared are trained unsquared."""
    p = [f"{name}: {getattr(c, name)} must be a multiple of 8 (the autoencoder's 8 pixels a latent), or 0."
         for name in ("bucket_min_side", "bucket_max_side") if getattr(c, name) % 8]
    if c.square_mode == "keep" and not c.bucketing:
        p.append("square_mode=keep with bucketing=false: prep would keep each picture's shape, then training would "
                 f"{'crop' if c.center_crop else 'squeeze'} every one to a {c.resolution}x{c.resolution} square. "
                 "Set bucketing=true (notebook 02, beside square_mode) to train them at their own shapes, or "
                 "square_mode=pad to square them in prep.")
    if c.bucket_min_side and c.bucket_min_side > c.resolution:
        p.append(f"bucket_min_side: {c.bucket_min_side} is above resolution {c.resolution}, so no bucket is "
                 "square: set it at most the resolution, or 0 (half the resolution).")
    if c.bucket_max_side and c.bucket_max_side < c.resolution:
        p.append(f"bucket_max_side: {c.bucket_max_side} is below resolution {c.resolution}, so no bucket is "
                 "square: set it at least the resolution, or 0 (twice the resolution).")
    return p
