"""The tiny world: procedurally drawn characters that the embedded pretrained model knows.

Every character is a few flat colours on white, at 64×64: hair of one colour, a two-colour
outfit that differs on the image's left and right halves (the seed's asymmetric
yellow/black design), a hair coil on one side only, and a framing (full body or upper
body), placed with a small random shift and scale. Captions name the attributes with the
class word ("girl, pink hair, yellow and black outfit, coil on the left, full body"; the
first outfit colour is the image's left). `analyze` reads the same attributes back from
any image by pixel colours alone, so DreamBooth's effects in this world — fidelity,
hflip mixing the sides, language drift, overfitting — are scored without another model.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from dbnb.evaluate.scorers.base import ScoreError, images_of, row_scores

SIZE = 64
CLASS_WORD = "girl"
SKIN, COIL = (255, 222, 196), (250, 190, 40)
HAIR = {"pink": (240, 110, 180), "blue": (50, 100, 230), "green": (40, 160, 70), "purple": (130, 60, 190),
        "red": (210, 30, 40), "brown": (110, 60, 30)}
OUTFIT = {"yellow": (250, 215, 20), "black": (20, 20, 20), "red": (210, 30, 40), "blue": (50, 100, 230),
          "green": (40, 160, 70), "purple": (130, 60, 190)}
FRAMINGS = ("full body", "upper body")
# Figure pixels (not skin) in the bottom 4 rows that mark a picture cut at the waist.
FRAMING_CUT_PIXELS = 16


@dataclass(frozen=True)
class Character:
    hair: str
    left: str  # outfit colour on the image's left half
    right: str
    coil: str  # "left" / "right": the side of the image the hair coil is on
    framing: str = "full body"
    dx: int = 0  # horizontal shift in pixels (of 64)
    scale: float = 1.0

    def flipped(self) -> "Character":
        """The character as a horizontal flip shows it: sides swapped."""
        return replace(self, left=self.right, right=self.left,
                       coil="right" if self.coil == "left" else "left", dx=-self.dx)


# The demo's character: the seed's asymmetric design (yellow left / black right, a coil on one side).
HERO = Character(hair="pink", left="yellow", right="black", coil="left")


def random_character(rng: random.Random) -> Character:
    left, right = rng.sample(sorted(OUTFIT), 2)
    return Character(hair=rng.choice(sorted(HAIR)), left=left, right=right, coil=rng.choice(("left", "right")),
                     framing=rng.choice(FRAMINGS), dx=rng.randint(-6, 6), scale=rng.uniform(0.85, 1.1))


def pose(character: Character, rng: random.Random, framings: tuple[str, ...] = FRAMINGS) -> Character:
    """The same character in another framing / position (what a user's 4–6 pictures vary)."""
    return replace(character, framing=rng.choice(framings), dx=rng.randint(-6, 6), scale=rng.uniform(0.85, 1.1))


def caption(character: Character, token: str = "") -> str:
    who = f"{token} {CLASS_WORD}" if token else CLASS_WORD
    return (f"{who}, {character.hair} hair, {character.left} and {character.right} outfit, "
            f"coil on the {character.coil}, {character.framing}")


def draw(character: Character, size: int = SIZE) -> Image.Image:
    """The character on white; drawn at 4× and downsampled so edges are smooth."""
    k = 4 * size / SIZE
    big = int(SIZE * k)
    image = Image.new("RGB", (big, big), "white")
    d = ImageDraw.Draw(image)
    upper = character.framing == "upper body"
    s = character.scale * (1.45 if upper else 1.0)
    cx = (SIZE / 2 + character.dx) * k
    head_r, head_y = 9 * s * k, (22 if upper else 13) * k
    body_top = head_y + head_r * 0.9
    body_bottom = big if upper else min(big - 2 * k, body_top + 30 * s * k)
    half = 11 * s * k
    # legs first, so the outfit covers their tops
    if not upper:
        for side in (-1, 1):
            x = cx + side * half * 0.45
            d.rectangle([x - 2.5 * k, body_bottom - 2 * k, x + 2.5 * k, min(big, body_bottom + 9 * k)], fill=SKIN)
    # the outfit: one colour per side of the image
    flare = half * (1.25 if not upper else 1.1)
    d.polygon([(cx, body_top), (cx - half, body_top + 2 * k), (cx - flare, body_bottom), (cx, body_bottom)],
              fill=OUTFIT[character.left])
    d.polygon([(cx, body_top), (cx + half, body_top + 2 * k), (cx + flare, body_bottom), (cx, body_bottom)],
              fill=OUTFIT[character.right])
    # hair, face, and the coil on one side
    d.ellipse([cx - head_r * 1.15, head_y - head_r * 1.1, cx + head_r * 1.15, head_y + head_r * 1.2],
              fill=HAIR[character.hair])
    d.ellipse([cx - head_r * 0.75, head_y - head_r * 0.35, cx + head_r * 0.75, head_y + head_r * 0.95], fill=SKIN)
    side = -1 if character.coil == "left" else 1
    coil_x, coil_r = cx + side * head_r * 1.35, head_r * 0.5
    d.ellipse([coil_x - coil_r, head_y - coil_r * 0.2, coil_x + coil_r, head_y + coil_r * 1.8], fill=COIL)
    return image.resize((size, size), Image.Resampling.BOX)


# ---- reading attributes back from pixels --------------------------------------------------

def _nearest(pixels: np.ndarray, palette: dict[str, tuple]) -> list[str]:
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float32)
    distance = ((pixels[:, None, :].astype(np.float32) - colours[None]) ** 2).sum(-1)
    return [names[i] for i in distance.argmin(1)]


def _majority(pixels: np.ndarray, palette: dict[str, tuple]) -> str | None:
    if len(pixels) < 3:
        return None
    return Counter(_nearest(pixels, palette)).most_common(1)[0][0]


def analyze(image: Image.Image) -> dict:
    """Hair colour, left / right outfit colours and coil side of a (generated) world image.

    Pixels are classified against the world's palette; the figure is what is not white. A
    value is None where the image holds no readable figure there.
    """
    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)).astype(np.int16)
    # classify every pixel once: background, skin, coil, or a hair/outfit colour
    palette = {"background": (255, 255, 255), "skin": SKIN, "coil": COIL,
               **{f"hair:{n}": c for n, c in HAIR.items()}, **{f"outfit:{n}": c for n, c in OUTFIT.items()}}
    labels = np.array(_nearest(rgb.reshape(-1, 3), palette)).reshape(SIZE, SIZE)
    figure = labels != "background"
    if figure.sum() < 40:
        return {"hair": None, "left": None, "right": None, "coil": None, "framing": None}
    ys, xs = np.nonzero(figure)
    cx = float(np.median(xs))
    coil_x = np.nonzero(labels == "coil")[1]
    coil = None if len(coil_x) < 3 else ("left" if np.median(coil_x) < cx else "right")
    # The hair is the most common hair-ish colour in the top part of the figure; the outfit
    # the most common outfit colour on each side of the centre line, below the head.
    top, bottom = ys.min(), ys.max()
    head = figure.copy()
    head[int(top + 0.45 * (bottom - top)):] = False
    hair = _majority(rgb[head & ~np.isin(labels, ["skin", "coil"])], HAIR)
    body = figure & ~np.isin(labels, ["skin", "coil"])
    body[: int(top + 0.5 * (bottom - top))] = False
    columns = np.arange(SIZE)[None, :].repeat(SIZE, 0)
    left = _majority(rgb[body & (columns < cx - 1)], OUTFIT)
    right = _majority(rgb[body & (columns > cx + 1)], OUTFIT)
    # An upper-body picture cuts the outfit at the image's bottom edge; a full figure stands
    # on its legs (skin) well above it, at every scale the world draws.
    cut = np.isin(labels[-4:], ["background", "skin", "coil"], invert=True).sum()
    framing = "upper body" if cut >= FRAMING_CUT_PIXELS else "full body"
    return {"hair": hair, "left": left, "right": right, "coil": coil, "framing": framing}


def judge(analysis: dict, character: Character) -> dict:
    """How a sample relates to one character: all of it, its sides swapped, or neither."""
    same = analysis["left"] == character.left and analysis["right"] == character.right
    swapped = analysis["left"] == character.right and analysis["right"] == character.left
    return {"hair": analysis["hair"] == character.hair, "outfit": same, "swapped": swapped,
            "left": analysis["left"] == character.left,
            "identity": analysis["hair"] == character.hair and same}


def dataset(n: int, seed: int = 0, size: int = SIZE):
    """n random characters: (image, caption) pairs, reproducible from the seed."""
    rng = random.Random(seed)
    for _ in range(n):
        c = random_character(rng)
        yield draw(c, size), caption(c)


def character_of(images: list[Image.Image]) -> Character:
    """The character a set of (instance) images shows: the most common reading of each part."""
    readings = [analyze(im) for im in images]
    most = {k: Counter(r[k] for r in readings if r[k]).most_common(1) for k in ("hair", "left", "right", "coil")}
    if not all(most.values()):
        raise ValueError("These images show no character of the world (nothing readable on white).")
    return Character(**{k: v[0][0] for k, v in most.items()})


def figure_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of what is not white, at 64×64."""
    rgb = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX)).astype(np.int16)
    ys, xs = np.nonzero((255 - rgb).max(-1) > 60)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) >= 40 else None


# A sample whose figure sits within this many pixels of a training image's, on all four
# sides, copies that picture's pose. Poses drawn at random land this close to one of 5 given
# poses about 9% of the time (measured on 400 draws), so a model that generalizes scores near
# that and one that memorized its training pictures near 1.
COPY_PIXELS = 1


def copies_pose(image: Image.Image, training_boxes: list[tuple]) -> bool:
    box = figure_box(image)
    return box is not None and any(max(abs(a - b) for a, b in zip(box, t)) <= COPY_PIXELS
                                   for t in training_boxes if t)


def requested(prompt: str) -> dict:
    """The attributes a prompt asks for by the captions' words: {"hair": "blue", "framing": "upper body"}."""
    words = prompt.replace(",", " ").split()
    asked = {"hair": next((w for w, nxt in zip(words, words[1:]) if nxt == "hair" and w in HAIR), None),
             "framing": next((f for f in FRAMINGS if f in " ".join(words)), None)}
    return {k: v for k, v in asked.items() if v}


def follows(analysis: dict, asked: dict) -> bool:
    return all(analysis[k] == v for k, v in asked.items())


def metrics(fidelity: list[Image.Image], flexibility: list[tuple[str, Image.Image]], klass: list[Image.Image],
            character: Character, training: list[Image.Image]) -> dict:
    """The world's scores of one checkpoint's test images (shares in [0, 1]; NaN where no images).

    identity — fidelity images showing the character (hair and both outfit sides right);
    sides — fidelity images with the character's left-side colour on the left: hflip breaks
        this, training on both orientations blends the two sides' colours (the seed's warning);
    swapped — fidelity images with the outfit sides cleanly swapped;
    copies — fidelity images that are near-copies of a training image (overfitting);
    flexibility — flexibility images that show what their prompt asks for (a hair colour, a
        framing: "hnzk girl, upper body" when the training pictures are all full body);
    drift — class-prompt images that show the trained character (language drift);
    variety — distinct hair/outfit combinations among the class-prompt images, per image.
    """
    def share(flags):
        flags = list(flags)
        return sum(flags) / len(flags) if flags else float("nan")

    judged = [judge(analyze(im), character) for im in fidelity]
    asked = [(requested(p), im) for p, im in flexibility]
    klass_readings = [analyze(im) for im in klass]
    boxes = [figure_box(t) for t in training]
    return dict(
        identity=share(j["identity"] for j in judged),
        sides=share(j["left"] for j in judged),
        swapped=share(j["swapped"] for j in judged),
        copies=share(copies_pose(im, boxes) for im in fidelity),
        flexibility=share(follows(analyze(im), want) for want, im in asked if want),
        drift=share(judge(r, character)["identity"] for r in klass_readings),
        variety=(len({(r["hair"], r["left"], r["right"]) for r in klass_readings}) / len(klass)
                 if klass else float("nan")))


def world_table(samples, instance: list[Image.Image]) -> list[dict]:
    """`score_with=world`: `metrics` per row of a run's test images (a dbnb.evaluate.sample.SampleResult);
    the character is read off the instance images."""
    try:
        character = character_of(instance)
    except ValueError as e:
        raise ScoreError(f"score_with=world: the instance images are not pictures of dbnb's tiny world ({e}). "
                         "Use score_with=clip for real models.") from None
    rows = []
    for row in samples.rows:
        flexibility = [(p.text, im) for p, im in images_of(samples, row, "flexibility")]
        # the wide test image is left out: the pixel analysis reads the world's square pictures
        scores = metrics([im for p, im in images_of(samples, row, "fidelity") if not p.size], flexibility,
                         [im for _, im in images_of(samples, row, "class")], character, instance)
        rows.append(row_scores(row, **scores))
    return rows
