"""Open one picture, whatever it is, as a fully decoded RGBA image, or say why it cannot be.

Every failure is a `BadImage` with a reason a person can act on; the pipeline lists it and
goes on with the other files.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageFile, ImageOps, UnidentifiedImageError

from dbnb.core.errors import DbnbError

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImage(DbnbError):
    """This file cannot be used; str() is the reason."""


@dataclass
class Loaded:
    image: Image.Image                     # RGBA, EXIF orientation applied
    size: tuple[int, int]                  # as stored in the file (before rotation)
    mode: str                              # the file's own mode
    has_alpha: bool                        # some pixel is not fully opaque
    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: Path) -> Loaded:
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes): re-download or re-export it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        im = _open(path)
    notes = [f"very large ({im.size[0]}x{im.size[1]}): check it is the picture you meant"
             for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    loaded = Loaded(image=im, size=im.size, mode=im.mode, has_alpha=False, warnings=notes)
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        im.seek(0)
        loaded.warnings.append(f"animated ({frames} frames): only the first frame is used")
    _decode(im)
    orientation = im.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        loaded.done.append(f"EXIF orientation {orientation} applied")
    loaded.image, note = to_rgba(im)
    if note:
        loaded.done.append(note)
    loaded.has_alpha = loaded.image.getchannel("A").getextrema()[0] < 255
    return loaded


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        # The limit stays: a crafted file must not take all of Colab's RAM.
        raise BadImage(f"refused by Pillow's decompression-bomb limit ({e}); shrink the picture first") from None
    except UnidentifiedImageError:
        raise BadImage(f"not a picture Pillow can read (suffix {path.suffix!r} but other content)") from None
    except OSError as e:
        raise BadImage(f"cannot be opened ({e})") from None


def _decode(im: Image.Image) -> None:
    """Decode every pixel now: a truncated file must fail here, not as grey bands later."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # some libraries switch it on globally
    try:
        im.load()
    except Exception as e:  # noqa: BLE001 — decoders raise OSError, SyntaxError, ValueError, zlib errors …
        raise BadImage(f"damaged or truncated ({e}); re-download or re-export it") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgba(im: Image.Image) -> tuple[Image.Image, str]:
    """Any Pillow mode as RGBA, and a note when the conversion is worth telling."""
    mode = im.mode
    if mode in SIXTEEN_BIT or mode in ("I", "F"):
        return _deep_gray(im).convert("RGBA"), f"{mode} (high bit depth) scaled to 8 bits"
    if mode == "CMYK":
        return _cmyk_to_rgb(im).convert("RGBA"), "CMYK converted to RGB"
    if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "La", "RGBa"):
        return im.convert("RGBA"), ""
    if mode == "RGBA":
        return im.copy(), ""
    return im.convert("RGB").convert("RGBA"), ""


def _deep_gray(im: Image.Image) -> Image.Image:
    """16/32-bit gray or float: Pillow's own convert clips everything above 255 to white."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    elif im.mode in SIXTEEN_BIT or a.max(initial=0) > 255:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """With the embedded profile where there is one: print CMYK is far from naive RGB."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms  # lazy: optional: a Pillow built without littlecms has none

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 — a broken profile: fall back to Pillow's formula
            pass
    return im.convert("RGB")


def flatten(rgba: Image.Image, background: str) -> Image.Image:
    """RGBA onto the background colour (not black, as `.convert("RGB")` would)."""
    canvas = Image.new("RGBA", rgba.size, ImageColor.getrgb(background)[:3] + (255,))
    return Image.alpha_composite(canvas, rgba.convert("RGBA")).convert("RGB")


def dhash(rgb: Image.Image) -> int:
    """64-bit difference hash: a resized, re-encoded or slightly edited copy stays within a
    few bits, so near duplicates are found without comparing pixels."""
    small = np.asarray(rgb.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count() if hasattr(int, "bit_count") else bin(a ^ b).count("1")
