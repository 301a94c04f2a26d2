"""The training examples: instance and class images with their prompts, as tensors.

Everything random here (flip, crop position) takes an explicit `torch.Generator`, so the
trainer can derive each step's randomness from (seed, step) and a resumed run sees exactly
the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import functools
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from dbnb.core.errors import DbnbError
from dbnb.data.intake import IMAGE_SUFFIXES

FILEWORDS = "[filewords]"
LATENT_SCALE = 8  # SD 1.x's VAE: 8 pixels per latent


class DatasetError(DbnbError, ValueError):
    """An image folder or concept is unusable; the message names it and what to do."""


@dataclass(frozen=True)
class Concept:
    instance_data_dir: str
    instance_prompt: str
    class_data_dir: str = ""
    class_prompt: str = ""
    instance_token: str = ""
    class_token: str = ""


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str
    # The picture as the check decoded it, ready to train (see `Held`); None: read from `path`.
    held: "Held | None" = field(default=None, compare=False, repr=False)


class Held:
    """A picture decoded by the check, handed to the training set once: `take()` returns it and
    forgets it, so the pixels have one owner (the ImageSet, which frees them once the latents are
    cached) however long the examples list lives, and no file is decoded twice. `size`: the
    picture's (width, height) as decoded, which bucketing reads before the pixels are taken."""

    def __init__(self, value, size: tuple[int, int] | None = None):
        self._value, self.size = value, size

    def take(self):
        value, self._value = self._value, None
        return value


def concepts_from_config(config) -> list[Concept]:
    """The single concept of the config's fields, or the concepts of its `concepts_list` JSON."""
    if not config.concepts_list:
        return [Concept(config.instance_data_dir, config.instance_prompt, config.class_data_dir,
                        config.class_prompt, config.instance_token, config.class_token)]
    path = Path(config.concepts_list)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"concepts_list {path}: cannot read it as JSON ({e}).") from None
    if not isinstance(items, list) or not items:
        raise DatasetError(f"concepts_list {path}: expected a non-empty JSON list of concepts.")
    known = set(Concept.__dataclass_fields__)
    concepts = []
    for i, item in enumerate(items):
        extra = set(item) - known if isinstance(item, dict) else set()
        if not isinstance(item, dict) or extra or not item.get("instance_data_dir"):
            raise DatasetError(f"concepts_list {path}, concept {i}: needs instance_data_dir and instance_prompt; "
                               f"allowed keys are {', '.join(sorted(known))}"
                               + (f" (unknown: {', '.join(sorted(extra))})" if extra else "") + ".")
        concepts.append(Concept(**item))
    return concepts


def list_images(folder: str | Path, what: str) -> list[Path]:
    """The pictures at the top of `folder` (the trainer reads no subfolders)."""
    folder = Path(folder)
    if folder.is_file():
        kind = "a .zip" if zipfile.is_zipfile(folder) else "a file"
        raise DatasetError(f"{what} {folder} is {kind}, not a folder of pictures. "
                           + (f"Extract it first: `dbnb prep {folder} OUT` extracts it safely and prepares the "
                              f"pictures; then set {what} to OUT." if kind == "a .zip" else
                              f"Set {what} to the folder that holds the pictures."))
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" (read from the folder dbnb runs in: {folder.absolute()})"
        raise DatasetError(f"{what} {folder} does not exist{where}. Check the path (on Colab: is Drive mounted?).")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        below = _pictures_below(folder)
        where = (f" The pictures are one level down, in {', '.join(str(d) for d in below[:3])}"
                 f"{' …' if len(below) > 3 else ''}: set {what} to that folder (the trainer reads only the "
                 "folder's own pictures, not its subfolders)." if below else "")
        raise DatasetError(f"{what} {folder} has no images ({', '.join(IMAGE_SUFFIXES)}).{where}")
    return images


def _pictures_below(folder: Path) -> list[Path]:
    """Subfolders of `folder` that hold pictures: where they are when an archive kept its folder."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()))


# --- prompts ---------------------------------------------------------------------------------

def caption_for(image: Path) -> str:
    """The image's caption: the `.txt` beside it, or "" when there is none. A file name is no
    caption ('img_0001.png' would have trained on "img"); `check_captions` says which lack one."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return " ".join(txt.read_text(encoding="utf-8").split())
    return ""


def check_captions(template: str, images: list[Path], token: str, token_name: str, what: str) -> None:
    """With `[filewords]` in the prompt, pictures without a caption would train on a prompt
    without them: an error naming them, or (with the token set) the token alone and a warning."""
    if FILEWORDS not in template:
        return
    missing = [p for p in images if not caption_for(p)]
    if not missing:
        return
    names = ", ".join(p.name for p in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    where = f"{len(missing)} of {len(images)} pictures in {what} {images[0].parent} have no caption (.txt)"
    if not token:
        raise DatasetError(f"{where} but the prompt {template!r} uses [filewords]: {names}. Write their "
                           f"captions (`dbnb prep` does), set {token_name} to train them on it alone, or take "
                           "[filewords] out of the prompt.")
    warnings.warn(f"{where}: they train on {token_name} {token!r} alone ({names}).", stacklevel=3)


def build_prompt(template: str, image: Path, instance_token: str = "", class_token: str = "",
                 is_class: bool = False) -> str:
    """Fill `[filewords]` in a prompt template the way the Dreambooth extension documents it.

    Instance images: if the caption lacks the instance token, it is put in front of the class
    token ("1girl, smile" → "nanU 1girl, smile"), or in front of the caption when the class
    token is absent too. Class images: the instance token is removed from the caption.
    """
    if FILEWORDS not in template:
        return template
    words = caption_for(image) or (class_token if is_class else "")
    if instance_token:
        if is_class:
            words = re.sub(rf"\b{re.escape(instance_token)}\b\s*", "", words)
        elif not re.search(rf"\b{re.escape(instance_token)}\b", words):
            if class_token and re.search(rf"\b{re.escape(class_token)}\b", words):
                words = re.sub(rf"\b{re.escape(class_token)}\b", f"{instance_token} {class_token}", words, count=1)
            else:
                words = f"{instance_token} {words}".strip()
    prompt = template.replace(FILEWORDS, words)
    return " ".join(prompt.replace(" ,", ",").split()).strip(", ")


def usable_images(images: list[Path], what: str, skip_bad: bool, keep=None) -> list[Path] | dict[Path, Held]:
    """The pictures that decode, checked as `dbnb prep` checks them. A bad one is an error
    naming every bad file and its reason, or with `skip_bad` left out with a warning. With
    `keep(loaded)` (see `square_picture`): {path: Held(keep(its decoded picture))} instead of
    the paths, so the trainer reads each file once."""
    from dbnb.data.pictures import BadImage, load_image

    bad, held = [], {}
    for path in images:
        try:
            loaded = load_image(path)
        except BadImage as e:
            bad.append(f"{path.name}: {e}")
            continue
        except OSError as e:
            bad.append(f"{path.name}: cannot be read ({e.strerror or e})")
            continue
        held[path] = Held(keep(loaded), loaded.image.size) if keep is not None else None
    if bad:
        listing = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        where = f"{len(bad)} of {len(images)} pictures in {what} {images[0].parent} cannot be used"
        if not skip_bad:
            raise DatasetError(f"{where} — {listing}. Replace or remove them (`dbnb prep` checks and converts "
                               "pictures), or set skip_bad_images=true to train without them.")
        if not held:
            raise DatasetError(f"{where}: none is left to train on — {listing}.")
        warnings.warn(f"skip_bad_images: training without {where.split(' cannot')[0]} — {listing}.", stacklevel=3)
    return held if keep is not None else list(held)


def warn_same_prompts(c: Concept) -> None:
    """Prior preservation with the class prompt equal to the instance prompt teaches the class
    images as the character, the opposite of what they are for. Compared as CLIP reads them
    (case and spacing do not count); a [filewords] template differs per picture, so it passes."""
    same = " ".join(c.class_prompt.lower().split())
    if same and FILEWORDS not in same and same == " ".join(c.instance_prompt.lower().split()):
        warnings.warn(f"class_prompt is the same as instance_prompt ({c.instance_prompt!r}) with prior preservation "
                      f"on: the class images in {c.class_data_dir} would be learnt as the character too. Set "
                      "class_prompt to the class alone, without the character's word (e.g. 'Unan' for 'nanU Unan').", stacklevel=3)


def examples_for(concepts: list[Concept], with_class: bool, skip_bad: bool = False,
                 keep=None) -> tuple[list[Example], list[Example]]:
    """The examples of every concept; with `keep` each carries its checked picture (see
    `usable_images`)."""
    instance, klass = [], []
    for c in concepts:
        if not c.instance_prompt.strip():
            raise DatasetError(f"instance_prompt is empty for {c.instance_data_dir}: set the prompt that "
                               "will call the character (e.g. 'nanU Unan').")
        images = _checked(list_images(c.instance_data_dir, "instance_data_dir"), "instance_data_dir", skip_bad, keep)
        check_captions(c.instance_prompt, list(images), c.instance_token, "instance_token", "instance_data_dir")
        for p, held in images.items():
            instance.append(Example(p, build_prompt(c.instance_prompt, p, c.instance_token, c.class_token), held))
        if with_class:
            warn_same_prompts(c)
            images = _checked(list_images(c.class_data_dir, "class_data_dir"), "class_data_dir", skip_bad, keep)
            check_captions(c.class_prompt, list(images), c.class_token, "class_token", "class_data_dir")
            for p, held in images.items():
                klass.append(Example(p, build_prompt(c.class_prompt, p, c.instance_token, c.class_token,
                                                     is_class=True), held))
    return instance, klass


def _checked(images: list[Path], what: str, skip_bad: bool, keep) -> dict[Path, Held | None]:
    if keep is not None:
        return usable_images(images, what, skip_bad, keep)
    return dict.fromkeys(usable_images(images, what, skip_bad))


# --- captions in training (kohya's shuffle_caption / keep_tokens / dropouts) -------------------

@dataclass(frozen=True)
class CaptionRules:
    """How each step varies a prompt, with kohya sd-scripts' meaning (`process_caption`):
    the whole caption is dropped (made empty) with `dropout_rate`; otherwise it is split at
    commas, the first `keep_tokens` tags stay in place, the rest are shuffled
    (`shuffle`) and then each of them is dropped with `tag_dropout_rate`. Kept tags are never
    dropped. Without shuffle and tag dropout the caption is left as written."""
    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @classmethod
    def from_config(cls, config) -> "CaptionRules":
        return cls(config.shuffle_caption, config.keep_tokens, config.caption_dropout_rate,
                   config.caption_tag_dropout_rate)

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0


def vary_caption(prompt: str, rules: CaptionRules, generator: torch.Generator) -> str:
    """One step's version of `prompt`. Every draw comes from `generator` (the trainer makes it
    from (seed, step)), a fixed number of draws per caption, so a resumed run varies exactly
    as the uninterrupted one did."""
    drop = float(torch.rand(1, generator=generator)) < rules.dropout_rate
    tags = [t.strip() for t in prompt.split(",")]
    fixed, flex = tags[:rules.keep_tokens], tags[rules.keep_tokens:]
    order = torch.randperm(len(flex), generator=generator).tolist()
    keep = (torch.rand(len(flex), generator=generator) >= rules.tag_dropout_rate).tolist()
    if drop:
        return ""
    if not (rules.shuffle or rules.tag_dropout_rate > 0):
        return prompt
    if rules.shuffle:
        flex = [flex[i] for i in order]
    flex = [t for t, k in zip(flex, keep) if k]
    return ", ".join(t for t in fixed + flex if t)


def tokenize(tokenizer, examples: list[Example], cut: list[tuple[Example, int]] | None = None) -> torch.Tensor:
    """Token ids [N, 77]; prompts past CLIP's 75 tokens are cut, each added to `cut` with its
    token count (warn_cut says so, once for the run)."""
    ids = []
    limit = tokenizer.model_max_length
    for ex in examples:
        full = tokenizer(ex.prompt, truncation=False).input_ids
        if len(full) > limit and cut is not None:
            cut.append((ex, len(full) - 2))
        ids.append(tokenizer(ex.prompt, truncation=True, padding="max_length", max_length=limit).input_ids)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_prompts(tokenizers: dict, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every tokenizer's token ids of `prompts` (name -> [N, its max length]), cut at its 75 tokens."""
    return {name: torch.tensor(t(prompts, truncation=True, padding="max_length",
                                 max_length=t.model_max_length).input_ids, dtype=torch.long)
            for name, t in tokenizers.items()}


def warn_cut(cut: list[tuple[Example, int]], total: int) -> None:
    """One warning for every prompt that was cut, with the longest as the example: a warning
    per picture buried the run's start under dozens of lines saying the same."""
    if not cut:
        return
    example, tokens = max(cut, key=lambda c: c[1])
    warnings.warn(f"{len(cut)} of {total} training prompts have more than CLIP's 75 tokens and are cut at 75 (the "
                  f"rest is not learnt); the longest: {example.path} ({tokens} tokens). Shorten their captions "
                  "(the .txt beside each picture) if the words at the end matter.", stacklevel=3)


# --- pixels ----------------------------------------------------------------------------------

def load_rgb(path: Path, background: str = "white") -> Image.Image:
    """RGB with transparency composited onto `background`, decoded as `dbnb prep` decodes (EXIF
    orientation, 16-bit and CMYK scaled, a GIF's first frame): every IMAGE_SUFFIXES file trains
    as it looks. Plain `.convert("RGB")` would turn fully transparent pixels black — what the
    old trainers silently did to transparent class images."""
    from dbnb.data.pictures import flatten, load_image

    return flatten(load_image(path).image, background)


def latent_mask(alpha: Image.Image | None, resolution: int, center_crop: bool) -> torch.Tensor:
    """[1, resolution/8, resolution/8] in 0..1: the alpha squared like the picture, then
    area-averaged to the latent grid (kohya's --alpha_mask); ones without alpha."""
    side = resolution // LATENT_SCALE
    if alpha is None:
        return torch.ones(1, side, side)
    full = torch.from_numpy(np.asarray(to_square(alpha, resolution, center_crop), dtype=np.float32) / 255.0)
    return torch.nn.functional.interpolate(full[None, None], size=(side, side), mode="area")[0]


def to_square(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Resize the short side to `resolution`, then take the center square (center_crop) or
    squeeze the whole image (the extension's behaviour without Center Crop on non-square input)."""
    if center_crop:
        return ImageOps.fit(image, (resolution, resolution), Image.Resampling.LANCZOS)
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS)


def square_picture(loaded, resolution: int, center_crop: bool, background: str,
                   alpha_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What training keeps of one decoded picture (`dbnb.data.pictures.Loaded`): [3, H, W] uint8,
    composited onto `background` and squared, and with `alpha_mask` its latent-size mask. uint8,
    not the VAE's floats: a quarter of the RAM (512 px: 0.75 MiB, not 3 MiB)."""
    from dbnb.data.pictures import flatten

    square = to_square(flatten(loaded.image, background), resolution, center_crop)
    picture = torch.from_numpy(np.asarray(square, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    alpha = loaded.image.getchannel("A") if loaded.has_alpha else None
    return picture, latent_mask(alpha, resolution, center_crop) if alpha_mask else None


def keep_square(resolution: int, center_crop: bool, background: str, alpha_mask: bool):
    """`usable_images`' keep for training: the square picture tagged with its settings, so an
    ImageSet made with other settings reads the file instead of taking a picture it would not make."""
    settings = (resolution, center_crop, background, alpha_mask)
    return lambda loaded: (settings, square_picture(loaded, *settings))


def unit_range(pictures: torch.Tensor) -> torch.Tensor:
    """uint8 pictures as the VAE reads them: fp32 in [-1, 1]."""
    return pictures.float() / 127.5 - 1.0


class ImageSet:
    """Examples of one kind (instance or class): the pictures (uint8, until `drop_pictures`),
    token inputs and alpha masks. `tokenizers`: name -> tokenizer, one token input each (a
    model family with two tokenizers has two); a lone tokenizer is {"input_ids": it}. `picture`:
    (settings tag, make(loaded) -> (picture, mask)) to make them otherwise than squared (an
    aspect bucket: dbnb.data.buckets.picture_maker)."""

    def __init__(self, examples: list[Example], tokenizers, resolution: int, center_crop: bool,
                 background: str, hflip: bool, captions: CaptionRules = CaptionRules(), alpha_mask: bool = False,
                 picture=None):
        from dbnb.data.pictures import load_image

        self.tokenizers = tokenizers if isinstance(tokenizers, dict) else {"input_ids": tokenizers}
        self.captions = captions
        self.cut: list[tuple[Example, int]] = []  # prompts past 75 tokens, for one warning (warn_cut)
        # the cut prompts are noted from the first tokenizer only: each prompt once
        self.inputs = {name: tokenize(t, examples, self.cut if k == 0 else None)
                       for k, (name, t) in enumerate(self.tokenizers.items())}
        square = (resolution, center_crop, background, alpha_mask)
        settings, make = picture or (square, lambda loaded: square_picture(loaded, *square))
        prepared = []
        for e in examples:  # the check's decoded picture when it kept one; the file otherwise
            made, kept = (e.held.take() if e.held is not None else None) or (None, None)
            prepared.append(kept if made == settings else make(load_image(e.path)))
        self.examples = [replace(e, held=None) for e in examples]
        self.images: torch.Tensor | None = torch.stack([p for p, _ in prepared])
        self.hflip = hflip
        # alpha_mask_loss: the loss weights at latent size, made once (they need no VAE, so they
        # serve cached and uncached latents alike); flipped with the picture in `mask_batch`.
        self.masks = torch.stack([m for _, m in prepared]) if alpha_mask else None

    def __len__(self):
        return len(self.examples)

    def drop_pictures(self) -> None:
        """Free the pixels once their latents are cached (3 MiB a picture as floats at 512 px)."""
        self.images = None

    def flips(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which of n picks are mirrored: half on average with hflip, never without."""
        if not self.hflip:
            return torch.zeros(n, dtype=torch.bool)
        return torch.rand(n, generator=generator) < 0.5

    @property
    def input_ids(self) -> torch.Tensor:
        """The "input_ids" token input (SD 1.x's only one)."""
        return self.inputs["input_ids"]

    def token_inputs(self, indices: list[int], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Every token input of the picks' prompts, varied by the caption rules when they are on
        (each prompt varied once, then tokenized by each tokenizer; cut at CLIP's 75 tokens from
        the end; warn_cut told of the full prompt once)."""
        if not self.captions.active:
            return {name: ids[indices] for name, ids in self.inputs.items()}
        return tokenize_prompts(self.tokenizers, [vary_caption(self.examples[i].prompt, self.captions, generator)
                                                  for i in indices])

    def token_ids(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """The "input_ids" token input of the picks' prompts (see token_inputs)."""
        return self.token_inputs(indices, generator)["input_ids"]

    def mask_batch(self, indices: list[int], flips: torch.Tensor) -> torch.Tensor | None:
        if self.masks is None:
            return None
        masks = self.masks[indices]
        return torch.where(flips[:, None, None, None], masks.flip(-1), masks)

    def without_loss(self) -> list[Path]:
        """Pictures whose mask is zero everywhere (fully transparent): they would add no loss."""
        if self.masks is None:
            return []
        return [e.path for e, m in zip(self.examples, self.masks) if not m.any()]

    def picks(self, indices: list[int], flips: torch.Tensor) -> torch.Tensor:
        """The picks' pictures (uint8), mirrored where `flips` says."""
        if self.images is None:
            raise RuntimeError("ImageSet.picks after drop_pictures: the latents are cached, read them instead")
        images = self.images[indices]
        return torch.where(flips[:, None, None, None], images.flip(-1), images)

    def batch(self, indices: list[int], flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pictures (fp32 in [-1, 1]) and token ids of the picks, mirrored where `flips` says."""
        return unit_range(self.picks(indices, flips)), self.input_ids[indices]


@functools.lru_cache(maxsize=4)  # called once per item of every batch: shuffle each epoch once
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """A fresh shuffle each epoch that depends only on (seed, epoch), for exact resume."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_positions(micro_step: int, batch_size: int, rank: int, world: int, epoch_len: int,
                    seed: int) -> list[int]:
    """Dataset indices of one process's micro-batch. The global stream of shuffled epochs is
    cut into consecutive slices of `batch_size * world`; process `rank` takes its slice, so
    processes never see the same item in the same step and a resumed run continues the stream."""
    start = (micro_step * world + rank) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, epoch_len)
        out.append(epoch_order(epoch_len, seed, epoch)[offset])
    return out


def refuse_masked_out_class_images(klass: ImageSet) -> None:
    """alpha_mask_loss with fully transparent class images (class_images_mode=transparent):
    their mask is zero everywhere, so prior preservation would silently do nothing."""
    empty = klass.without_loss()
    if empty:
        raise DatasetError(
            f"alpha_mask_loss is on, but {len(empty)} class image(s) in {empty[0].parent} are fully transparent "
            f"(e.g. {empty[0].name}): the alpha mask gives them no loss at all, so the class images would do "
            "nothing. Generate class images (class_images_mode=generate), or turn alpha_mask_loss off (the "
            "transparent images then train as plain background_color pictures).")


def select_class_images(examples: list[Example], wanted: int) -> list[Example]:
    """The first `wanted` class images. Fewer than that is an error naming both numbers (the
    seed's warning: 'Total Number of Class/Reg Images' must match the folder); more are
    allowed, and the extras are left out with a note."""
    if len(examples) < wanted:
        folder = examples[0].path.parent if examples else "class_data_dir"
        raise DatasetError(f"num_class_images is {wanted} but {folder} holds {len(examples)} class images. "
                           f"Generate the missing {wanted - len(examples)} (`dbnb classimages`), "
                           f"or set num_class_images={len(examples)}.")
    if len(examples) > wanted:
        print(f"[dbnb] class images: using the first {wanted} of {len(examples)} in "
              f"{examples[0].path.parent} (num_class_images={wanted}).", flush=True)
    return examples[:wanted]
