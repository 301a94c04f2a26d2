"""Squares, faces and the extra framings (bust-up and cowboy shot) of one picture.

Boxes from a face detector are (x, y, width, height), animeface's order; regions of the
picture are (left, top, side) squares. The detector is any function rgb -> boxes, so the
crops work (and are tested) without animeface, from boxes given by hand.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from PIL import Image, ImageColor

from dbnb.data import buckets

Box = tuple[int, int, int, int]
FaceDetector = Callable[[Image.Image], list[Box]]

DETECT_SIDE = 1024       # animeface is slow on 4000 px pictures and gains nothing from them
FACE_SHARE = 0.40        # face height / character height at or above this: a close-up
BUST_SHARE = 0.15        # … at or above this: bust-up to cowboy shot; below: full body
EDGE_STD = 8.0           # an edge this even is "plain": padding in its colour shows no band
# Extra framings, in face heights: the box starts 0.9 above the face box (hair) and is this
# tall, so a bust-up reaches below the chest and a cowboy shot to mid-thigh. Each is made
# only when it is clearly smaller than the character (else it would repeat the picture).
FRAMINGS = {"bust": (4.1, 0.70), "cowboy": (6.6, 0.85)}
HAIR = 0.9
FRAMING_TAGS = {"face": "portrait", "bust": "upper body", "cowboy": "cowboy shot", "full body": "full body"}


def animeface_detector() -> FaceDetector | None:
    """animeface's detector (its model ships in the wheel, no download), or None when the
    package is not installed."""
    try:
        import animeface  # lazy: optional animeface
    except ImportError:
        return None

    def detect(rgb: Image.Image) -> list[Box]:
        with warnings.catch_warnings():  # animeface 2.0.3 calls Image.getdata, deprecated in Pillow 12
            warnings.simplefilter("ignore", DeprecationWarning)
            faces = animeface.detect(rgb)
        return [(f.face.pos.x, f.face.pos.y, f.face.pos.width, f.face.pos.height)
                for f in faces if f.likelihood >= 0.5]

    detect.name = "animeface"
    return detect


def main_face(detector: FaceDetector, rgb: Image.Image) -> Box | None:
    """The largest face, in the picture's own pixels."""
    scale = min(1.0, DETECT_SIDE / max(rgb.size))
    small = rgb if scale == 1.0 else rgb.resize((round(rgb.width * scale), round(rgb.height * scale)),
                                                Image.Resampling.BILINEAR)
    boxes = [tuple(b) for b in detector(small)]
    if not boxes:
        return None
    return tuple(round(v / scale) for v in max(boxes, key=lambda b: b[2] * b[3]))


def subject_box(mask: Image.Image | None, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the character: the mask's extent, else the picture."""
    bbox = mask.point(lambda v: 255 if v >= 128 else 0).getbbox() if mask is not None else None
    return bbox or (0, 0, *size)


def framing_of(face: Box | None, subject: tuple[int, int, int, int]) -> str:
    """face / bust / full body from the face's share of the character's height."""
    if face is None:
        return "unknown"
    share = face[3] / max(1, subject[3] - subject[1])
    return "face" if share >= FACE_SHARE else "bust" if share >= BUST_SHARE else "full body"


# --- squares ---------------------------------------------------------------------------------

def fit(image: Image.Image, resolution: int) -> Image.Image:
    if image.size == (resolution, resolution):
        return image
    # reducing_gap: a fast box pre-shrink for big pictures, then Lanczos; same quality.
    return image.resize((resolution, resolution), Image.Resampling.LANCZOS, reducing_gap=3.0)


def reaches(mask: Image.Image, edge: str) -> bool:
    """The character (mask >= 128) touches the picture's `edge` ("top" or "bottom")."""
    row = np.asarray(mask.convert("L"))[0 if edge == "top" else -1]
    return bool((row >= 128).any())


def pad_square(rgb: Image.Image, background: str,
               mask: Image.Image | None = None) -> tuple[Image.Image, str, bool]:
    """The whole picture on a square: (square, warning, set on the bottom edge).

    A wide picture whose character reaches the bottom edge (a bust-up's cut torso) goes on the
    bottom: centred, it would float over a blank band under the cut, and the model learns that
    look. Without a mask, a plain top edge over a busy bottom one tells the same. The padding
    takes the colour of the edges it continues when they are plain (after background removal:
    the background colour), so no band shows; otherwise the background colour, with a warning."""
    w, h = rgb.size
    if w == h:
        return rgb, "", False
    side = max(w, h)
    if rgb.mode == "RGBA":  # keep_alpha: the padding is transparent, so the masked loss ignores it
        bottom = w > h and reaches(mask if mask is not None else rgb.getchannel("A"), "bottom")
        canvas = Image.new("RGBA", (side, side), ImageColor.getrgb(background)[:3] + (0,))
        canvas.paste(rgb, ((side - w) // 2, side - h if bottom else (side - h) // 2))
        return canvas, "", bottom
    colour, bottom, warning = _padding(np.asarray(rgb, dtype=np.float32), w > h, mask, background)
    canvas = Image.new("RGB", (side, side), colour)
    canvas.paste(rgb, ((side - w) // 2, side - h if bottom else (side - h) // 2))
    return canvas, warning, bottom


def _padding(a: np.ndarray, wide: bool, mask: Image.Image | None, background: str) -> tuple[tuple, bool, str]:
    """(colour, on the bottom?, warning) of the padding of picture array `a`."""
    def plain(edges):
        return edges.std(axis=0).max() <= EDGE_STD

    first, last = (a[0], a[-1]) if wide else (a[:, 0], a[:, -1])
    both = np.concatenate([first, last])
    if wide and mask is not None:
        bottom = reaches(mask, "bottom")
    else:  # no mask: a plain top edge over a busy bottom edge is a character cut by the bottom
        bottom = wide and not plain(both) and plain(first)
    edges = first if bottom else both  # on the bottom, all the padding continues the top edge
    if plain(edges):
        return tuple(int(v) for v in np.median(edges, axis=0)), bottom, ""
    return ImageColor.getrgb(background)[:3], bottom, (
        "the padded edges are not a plain colour, so the padding shows a band: turn remove_background on or "
        "use square_mode=center")


def place(centre_x: float, top: float, side: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """A square of `side` centred on centre_x from `top`, moved inside the picture where it fits."""
    w, h = size
    left = centre_x - side / 2
    left = min(max(left, 0), w - side) if side <= w else (w - side) / 2
    top = min(max(top, 0), h - side) if side <= h else (h - side) / 2
    return round(left), round(top), side


def crop_square(rgb: Image.Image, region: tuple[int, int, int], background: str) -> Image.Image:
    """The region; parts outside the picture are background colour (PIL's crop gives black),
    transparent for an RGBA picture (keep_alpha)."""
    left, top, side = region
    fill = ImageColor.getrgb(background)[:3] + ((0,) if rgb.mode == "RGBA" else ())
    canvas = Image.new(rgb.mode, (side, side), fill)
    inside = (max(left, 0), max(top, 0), min(left + side, rgb.width), min(top + side, rgb.height))
    canvas.paste(rgb.crop(inside), (inside[0] - left, inside[1] - top))
    return canvas


def make_square(rgb: Image.Image, mode: str, resolution: int, background: str, face: Box | None = None,
                mask: Image.Image | None = None) -> tuple[Image.Image, list[str], list[str]]:
    """square_mode pad / center / face, then the training size. Returns (image, done, warnings).
    `mask`: the character's, when cut out (padding puts a picture it reaches the bottom of there)."""
    done, warns = [], []
    if mode == "face" and face is None:
        warns.append("no face found for square_mode=face: padded instead")
        mode = "pad"
    side = min(rgb.size)
    if mode == "center":
        square = crop_square(rgb, place(rgb.width / 2, (rgb.height - side) / 2, side, rgb.size), background)
        done.append("center-cropped")
    elif mode == "face":
        x, y, w, h = face
        square = crop_square(rgb, place(x + w / 2, y + h / 2 - 0.4 * side, side, rgb.size), background)
        done.append("cropped around the face")
    else:
        square, warning, bottom = pad_square(rgb, background, mask)
        if square is not rgb:
            done.append("padded to square" + (", on the bottom edge (the character reaches it)" if bottom else ""))
        warns += [warning] if warning else []
    if square.width < resolution:
        warns.append(f"low resolution: {square.width}px square, upscaled to {resolution}")
    done.append(f"resized to {resolution}")
    return fit(square, resolution), done, warns


def keep_shape(rgb: Image.Image, config) -> tuple[Image.Image, list[str], list[str]]:
    """square_mode=keep: the picture at the aspect bucket training will give it (about resolution²
    pixels, cropped by as little as the bucket's shape leaves), never enlarged. Returns (image,
    done, warnings) as `make_square` does."""
    size, small = buckets.kept_size(rgb.size, config)
    done = [f"kept its shape: resized to {size[0]}x{size[1]} (its bucket)"]
    warns = [f"low resolution: {rgb.width}x{rgb.height}px, kept at {size[0]}x{size[1]}; training enlarges it by "
             f"at most bucket_upscale_limit ({config.bucket_upscale_limit:g})"] if small else []
    return buckets.fit(rgb, size), done, warns


def framing_regions(face: Box, subject: tuple[int, int, int, int],
                    size: tuple[int, int]) -> dict[str, tuple[int, int, int]]:
    """Bust-up and cowboy-shot squares of a full-body picture: from above the hair down past
    the chest (bust) or to mid-thigh (cowboy). Never a face-only close-up (the seed: they hurt)."""
    x, y, w, h = face
    subject_h = subject[3] - subject[1]
    regions = {}
    for name, (height, share) in FRAMINGS.items():
        side = round(height * h)
        if side <= share * subject_h and side <= max(size):
            regions[name] = place(x + w / 2, y - HAIR * h, side, size)
    return regions


def framing_crops(rgb: Image.Image, face: Box, subject: tuple[int, int, int, int], resolution: int,
                  background: str) -> dict[str, tuple[Image.Image, list[str]]]:
    """name -> (image at the training size, warnings). Crops under half the resolution are
    left out: an upscaled thumbnail teaches blur."""
    out = {}
    for name, region in framing_regions(face, subject, rgb.size).items():
        if region[2] < resolution / 2:
            continue
        warns = [f"low resolution: {region[2]}px crop, upscaled to {resolution}"] if region[2] < resolution else []
        out[name] = (fit(crop_square(rgb, region, background), resolution), warns)
    return out
