"""Class (regularization, 正則化画像) images: generate them, write transparent ones, or import
them — and the count check that the notebook, the CLI and the trainer share.

The seed's users lose hours to two things here: a Colab session that dies halfway through
generating 200 images, and a "Total Number of Class/Reg Images" that does not match the
folder. So every image is numbered and written atomically (a PNG that exists is a finished
PNG), image k always comes from seed `class_seed + k`, a call only makes what is missing up
to `num_class_images` and never deletes, and the count rule is the trainer's own
(`dbnb.data.dataset.select_class_images`).

Transparent class images are composited onto `background_color` (white by default) by the
trainer like every other image, so they train as plain white pictures. The old extension
dropped alpha, so there they were black: `class_images_mode=black` (`write_blank_images(...,
black=True)`) writes opaque black ones to reproduce that. `background_color=black` would too,
but it also puts the cut-out training pictures on black, where the seed's users made them white.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from dbnb.core import hardware
from dbnb.core.disk import check_free_space, check_writable
from dbnb.core.platform import shown
from dbnb.core.precision import inference_dtype
from dbnb.core.progress import bar as tqdm
from dbnb.data import dataset as data
from dbnb.data.buckets import class_image_sizes
from dbnb.data.dataset import DatasetError
from dbnb.data.intake import IMAGE_SUFFIXES, FetchError, fetch_images
from dbnb.family.render import SAMPLERS, cpu_batch_size, make_scheduler, render
from dbnb.family.base import Models, family_of, pipeline_clip_skip

NAME = "class-{:05d}"  # zero-padded: the trainer's sorted listing is then the numbering order
TRANSPARENT_PER_INSTANCE = 10  # the seed: 10x the instance images
GPU_MAX_BATCH = 8
# Auto batch size on a GPU: VRAM left after the weights, minus room for the (sliced, one
# image at a time) VAE decode, divided by a generous per-image cost at 512 px in fp16 with
# CFG. An OOM still halves the batch and retries, so this only has to be about right.
GPU_RESERVE_GIB = 3.0
GPU_GIB_PER_IMAGE_512 = 0.75
PNG_BYTES_512 = 600_000  # a generous 512 px PNG, for the free-disk check


class ClassImagesError(DatasetError):
    """Class images cannot be made as configured; the message names the setting and what to do."""


@dataclass(frozen=True)
class ClassImageStatus:
    """How the class folder compares with what training will use."""
    folder: Path
    have: int     # images in the folder
    wanted: int   # num_class_images (or the transparent default of 10x the instance images)
    message: str  # one line for the notebook / CLI: the trainer's own wording

    @property
    def ok(self) -> bool:
        return self.have >= self.wanted

    @property
    def missing(self) -> int:
        return max(0, self.wanted - self.have)

    def __str__(self) -> str:
        return self.message


# --- which folder, how many --------------------------------------------------------------------

def class_folder(config) -> Path:
    if config.concepts_list:
        raise ClassImagesError("concepts_list is set: `dbnb classimages` works on one concept at a time. Run it "
                               "once per concept with class_data_dir=... class_prompt=... on the command line.")
    if not config.class_data_dir:
        raise ClassImagesError("class_data_dir is empty: set the folder for the class images "
                               "(e.g. /content/drive/MyDrive/dbnb/class/girl).")
    return Path(config.class_data_dir).expanduser()


def wanted_class_images(config) -> int:
    """num_class_images. 0 means: in transparent mode the seed's 10x the instance images, in
    import mode everything imported, else none."""
    if config.num_class_images:
        return config.num_class_images
    if config.class_images_mode == "import":  # 0: all that was imported
        return len(existing_images(class_folder(config)))
    if config.class_images_mode not in ("transparent", "black"):
        return 0
    if not config.instance_data_dir:
        raise ClassImagesError("num_class_images is 0 and instance_data_dir is empty, so there is nothing to take "
                               "10x of: set num_class_images, or instance_data_dir.")
    return TRANSPARENT_PER_INSTANCE * len(data.list_images(config.instance_data_dir, "instance_data_dir"))


def existing_images(folder: Path) -> list[Path]:
    """The folder's images in the trainer's order; none when it does not exist yet."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_class_images(config, wanted: int | None = None) -> ClassImageStatus:
    """Compare the class folder with num_class_images using the trainer's rule: fewer is an
    error naming both numbers, more means the first N are used. Nothing is printed or raised."""
    folder = class_folder(config)
    wanted = wanted_class_images(config) if wanted is None else wanted
    images = existing_images(folder)
    examples = [data.Example(p, "") for p in images]
    try:
        # The trainer prints its "using the first N" note; catch it so the caller decides.
        with contextlib.redirect_stdout(io.StringIO()) as note:
            data.select_class_images(examples, wanted)
        message = (note.getvalue().strip().removeprefix("[dbnb] ")
                   or f"class images: {len(images)} in {shown(folder)}, as num_class_images={wanted} asks.")
    except DatasetError as e:
        message = str(e) + ("" if images else f" (class_data_dir: {shown(folder)})")
    if len(images) < wanted and config.class_images_mode == "import":
        message += " (class_images_mode=generate tops the folder up from the base model.)"
    if wanted != config.num_class_images:
        message += f" Set num_class_images={wanted} in the config for training."
    return ClassImageStatus(folder, len(images), wanted, message)


def todo_indices(folder: Path, wanted: int) -> list[int]:
    """Numbers to write so the folder holds `wanted` images: the lowest free ones, so images
    deleted (or lost to a disconnect) are remade under their own number and seed."""
    images = existing_images(folder)
    taken = {p.stem for p in images}
    todo, k = [], 0
    while len(images) + len(todo) < wanted:
        if NAME.format(k) not in taken:
            todo.append(k)
        k += 1
    return todo


# --- writing files ---------------------------------------------------------------------------

def write_atomic(path: Path, payload: bytes) -> Path:
    """Temp name, then rename: a disconnect never leaves a half file under the real name
    (the `.part` suffix is not an image suffix, so it is never counted)."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return path


def png_bytes(image: Image.Image, parameters: str = "") -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters:  # A1111's PNG Info tab reads this chunk
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_numbered(folder: Path, k: int, png: bytes, caption: str) -> Path:
    """The caption first: a PNG that exists (= counts as done) always has its .txt."""
    stem = NAME.format(k)
    if caption:
        write_atomic(folder / f"{stem}.txt", caption.encode("utf-8"))
    return write_atomic(folder / f"{stem}.png", png)


def prepare_folder(folder: Path, count: int, resolution: int) -> None:
    check_writable(folder, "class images")
    check_free_space(folder, int(count * PNG_BYTES_512 * (resolution / 512) ** 2), f"{count} class images",
                     "Free some space there, or set class_data_dir to a folder on a disk with room.")


# --- transparent (and black) -------------------------------------------------------------------

def write_blank_images(folder: str | Path, count: int, resolution: int, caption: str = "",
                       black: bool = False, progress: bool = True, sizes=None) -> list[Path]:
    """Top `folder` up to `count` fully transparent RGBA PNGs (alpha 0 everywhere) of
    `resolution`², or with `black=True` opaque black RGB ones (what the old extension
    trained on when given transparent images). `sizes(n)`: the (width, height) of images
    0 .. n-1 instead (`dbnb.data.buckets.class_image_sizes`). Returns the files written."""
    folder = Path(folder)
    todo = todo_indices(folder, count)
    if not todo:
        return []
    prepare_folder(folder, len(todo), resolution)
    size_of = sizes(max(todo) + 1) if sizes else [(resolution, resolution)] * (max(todo) + 1)
    blank = lambda size: (Image.new("RGB", size, (0, 0, 0)) if black  # noqa: E731
                          else Image.new("RGBA", size, (0, 0, 0, 0)))
    pngs = {size: png_bytes(blank(size)) for size in set(size_of)}  # identical images: encode each size once
    return [save_numbered(folder, k, pngs[size_of[k]], caption)
            for k in tqdm(todo, desc="class images", unit="img", disable=not progress)]


# --- generation --------------------------------------------------------------------------------

def resolved_class_prompt(config) -> str:
    """class_prompt for writing images: `[filewords]` has no caption to come from yet, so it
    becomes class_token; the .txt written beside each image then serves [filewords]."""
    return " ".join(config.class_prompt.replace(data.FILEWORDS, config.class_token).split()).strip(", ")


def generation_prompt(config) -> str:
    prompt = resolved_class_prompt(config)
    if not prompt:
        raise ClassImagesError("class_prompt is empty" + (" once [filewords] is replaced by class_token"
                                                          if config.class_prompt else "")
                               + ": set class_prompt to the class word (e.g. '1girl' or 'Unan').")
    return prompt


def generation_device_dtype(config) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, inference_dtype(config.mixed_precision, device)


def open_base(config) -> Models:
    """The base model as its family opens it, in the dtype class images are sampled in on this machine."""
    _, dtype = generation_device_dtype(config)
    return family_of(config).open(config.pretrained_model_name_or_path, autoencoder=config.pretrained_vae_name_or_path,
                                  revision=config.revision, dtype=dtype)


def load_generation_pipeline(config, models: Models | None = None):
    """The base model (`models`, or opened here once) as its family's pipeline, ready to sample class
    images on this machine: sampler, device, dtype, attention and quiet inner bars."""
    device, dtype = generation_device_dtype(config)
    models = models or open_base(config)
    pipe = family_of(config).pipeline(models, models.denoiser)
    pipe.scheduler = make_scheduler(config.class_sampler, pipe.scheduler.config)
    pipe.to(device)
    if models.denoiser.dtype != dtype:  # models handed in; open_base opens them in dtype
        pipe.to(dtype=dtype)
    if config.attention == "xformers" and device.type == "cuda":
        if hardware.check_xformers(device.type).ok:
            pipe.enable_xformers_memory_efficient_attention()
    # Otherwise diffusers' default attention processor is already PyTorch SDPA.
    models.autoencoder.enable_slicing()  # decode one image at a time: the batch's VRAM peak is the denoiser's
    pipe.set_progress_bar_config(disable=True)  # one bar over images, not one per batch
    return pipe


def pick_batch_size(config, device: torch.device, dtype: torch.dtype = torch.float16) -> int:
    """class_batch_size, or for 0: by the picture size on a CPU (images.cpu_batch_size), from free
    VRAM on a GPU (call it after the weights are on it, so the free figure already excludes them)."""
    if config.class_batch_size:
        return config.class_batch_size
    if device.type != "cuda":
        return cpu_batch_size(config.resolution)

    gpu = hardware.cuda_summary()
    per_image = GPU_GIB_PER_IMAGE_512 * (config.resolution / 512) ** 2 * (2 if dtype == torch.float32 else 1)
    return max(1, min(GPU_MAX_BATCH, int((gpu["free_vram_gib"] - GPU_RESERVE_GIB) / per_image)))


def parameters_text(config, prompt: str, seed: int, size: tuple[int, int] | None = None) -> str:
    """A1111's generation-parameters text, so PNG Info shows how a class image was made."""
    negative = f"\nNegative prompt: {config.class_negative_prompt}" if config.class_negative_prompt else ""
    width, height = size or (config.resolution, config.resolution)
    return (f"{prompt}{negative}\nSteps: {config.class_infer_steps}, Sampler: {SAMPLERS[config.class_sampler][1]}, "
            f"CFG scale: {config.class_guidance_scale:g}, Seed: {seed}, Size: {width}x{height}")


@torch.inference_mode()
def render_batch(pipe, decode, config, prompt: str, indices: list[int], size: tuple[int, int] | None = None
                 ) -> list[Image.Image]:
    """One batch, `size` (width, height; default resolution²); image k has its own CPU generator
    seeded class_seed + k, so it is the same picture whatever the batch size or device."""
    width, height = size or (config.resolution, config.resolution)
    return render(pipe, decode, prompt, [config.class_seed + k for k in indices], negative=config.class_negative_prompt,
                  steps=config.class_infer_steps, guidance=config.class_guidance_scale, resolution=height,
                  width=width, clip_skip=pipeline_clip_skip(family_of(config), config.clip_skip))


def generate_class_images(config, progress: bool = True, models: Models | None = None) -> list[Path]:
    """Top class_data_dir up to num_class_images with images sampled from the base model
    (loaded once, and only when something is missing). `models`: the base model already open
    (Family.open's) to use instead. Returns the files written, in order."""
    folder, wanted = class_folder(config), wanted_class_images(config)
    if wanted < 1:
        raise ClassImagesError("num_class_images is 0: set how many class images to generate "
                               "(the seed: about 10x the instance images, e.g. num_class_images=200 for 20).")
    prompt = generation_prompt(config)
    todo = todo_indices(folder, wanted)
    if not todo:
        return []
    prepare_folder(folder, len(todo), config.resolution)
    models = models or open_base(config)
    pipe = load_generation_pipeline(config, models)
    decode = functools.partial(family_of(config).decode_latents, models.autoencoder)
    batch = pick_batch_size(config, *generation_device_dtype(config))  # where and how the pipeline now is
    # With bucketing, in the instance pictures' shapes; a batch is one shape, so they go shape by shape.
    sizes = class_image_sizes(config, max(todo) + 1)
    shapes = list(dict.fromkeys(sizes))
    todo = sorted(todo, key=lambda k: shapes.index(sizes[k]))
    written = []
    with tqdm(total=len(todo), desc=f"class images (batch {batch})", unit="img", disable=not progress) as bar:
        while len(written) < len(todo):
            size = sizes[todo[len(written)]]
            chunk = [k for k in todo[len(written):len(written) + batch] if sizes[k] == size]
            try:
                images = render_batch(pipe, decode, config, prompt, chunk, size)
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError, by the name torch < 2.5 has too
                batch = smaller_batch(batch, config)
                bar.set_description(f"class images (batch {batch})")
                continue
            for k, image in zip(chunk, images):
                png = png_bytes(image, parameters_text(config, prompt, config.class_seed + k, size))
                written.append(save_numbered(folder, k, png, prompt))
            bar.update(len(chunk))
    return written


def smaller_batch(batch: int, config) -> int:
    """After an out-of-memory error: half the batch, or give up at 1 with what to change."""
    torch.cuda.empty_cache()
    if batch == 1:
        raise ClassImagesError(f"Out of GPU memory generating class images at {config.resolution} px even one at a "
                               "time. Close other notebooks using the GPU, or lower resolution.")
    return batch // 2


# --- import ------------------------------------------------------------------------------------

def import_class_images(config) -> list[Path]:
    """Copy class images from class_images_import (folder, .zip, Drive link, URL list) into
    class_data_dir through the dataset importer. The trainer reads only the folder's top
    level, so nested pictures are flattened (`sub/a.png` → `sub_a.png`); every picture the
    importer takes, the trainer reads (one IMAGE_SUFFIXES). A rerun overwrites its own earlier
    copies instead of adding duplicates."""
    source = config.class_images_import
    if not source:
        raise ClassImagesError("class_images_mode is import but class_images_import is empty: set it to a folder, "
                               ".zip or Google Drive link holding the class images.")
    folder = class_folder(config)
    if Path(source).expanduser().resolve() == folder.resolve():
        return existing_images(folder)  # already in place: nothing to copy

    check_writable(folder, "class images")
    with tempfile.TemporaryDirectory(prefix="dbnb-classimport-") as tmp:
        try:
            fetched = fetch_images(source, Path(tmp))
        except FetchError as e:
            raise ClassImagesError(f"class_images_import {source!r}: {e}") from e
        return [place_imported(p, Path(tmp), folder) for p in sorted(fetched)]


def place_imported(image: Path, staging: Path, folder: Path) -> Path:
    stem = "_".join(image.relative_to(staging).with_suffix("").parts)
    caption = image.with_suffix(".txt")
    if caption.is_file():
        write_atomic(folder / f"{stem}.txt", caption.read_bytes())
    return write_atomic(folder / f"{stem}{image.suffix}", image.read_bytes())


# --- the one step -----------------------------------------------------------------------------

def make_class_images(config, progress: bool = True, models: Models | None = None) -> ClassImageStatus:
    """`dbnb classimages` and the regularization notebook: fill class_data_dir the way
    class_images_mode says, then report how it compares with num_class_images. Never deletes."""
    folder, mode = class_folder(config), config.class_images_mode
    if mode == "import":
        import_class_images(config)
    elif mode in ("transparent", "black"):  # "black": see the module docstring
        write_blank_images(folder, wanted_class_images(config), config.resolution, resolved_class_prompt(config),
                           black=mode == "black", progress=progress,
                           sizes=functools.partial(class_image_sizes, config))
    else:
        generate_class_images(config, progress=progress, models=models)
    return check_class_images(config)


def ensure_class_images(config, fill: bool = False, progress: bool = True) -> ClassImageStatus | None:
    """Before training with prior preservation: the folder must hold num_class_images. With
    `fill`, what is missing is made first (written blank in transparent mode, generated from
    the base model otherwise). Raises ClassImagesError naming both numbers if still short;
    returns the status (whose message says when only the first N are used). None when
    with_prior_preservation is off."""
    if not config.with_prior_preservation:
        return None
    status = check_class_images(config)
    if not status.ok and fill:
        mode = config.class_images_mode if config.class_images_mode in ("transparent", "black") else "generate"
        status = make_class_images(config.replace(class_images_mode=mode) if mode != config.class_images_mode
                                   else config, progress=progress)
    if not status.ok:
        raise ClassImagesError(status.message)
    return status
