"""Booru tags for a picture with a WD14-family tagger (SmilingWolf `wd-*-tagger-v3`).

The model's documented contract, followed exactly (SmilingWolf's `wd-tagger` space and
deepghs imgutils' `tagging/wd14.py` do the same): transparency onto white, the picture padded
to a centred white square, resized (bicubic) to the model's input size — read from the ONNX
input shape, NHWC, 448 for v3 — as float32 0–255 in **BGR** order. The first output holds a
sigmoid probability per tag, in `selected_tags.csv` order (`tag_id,name,category,count`):
category 9 = rating (never a caption tag), 4 = character, 0 = general. A tag is detected when
its probability is above its category's threshold.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dbnb.core.onnx import OnnxModel, OnnxModelError, model_files

MODEL_FILE, LABELS_FILE = "model.onnx", "selected_tags.csv"
DEFAULT_SIZE = 448
RATING, GENERAL, CHARACTER = 9, 0, 4
BATCH = 8


class TaggerError(OnnxModelError):
    """The tagger cannot be loaded; the message names `tagger_model` and the fix."""


@dataclass(frozen=True)
class Label:
    name: str        # as in selected_tags.csv (underscores)
    category: int


class Tagger:
    """`tagger.probabilities(images)` -> [N, tags]; `tagger.detect(images, ...)` -> tag dicts."""

    def __init__(self, folder_or_files: dict[str, Path]):
        self.model = OnnxModel(folder_or_files[MODEL_FILE], "tagger_model", TaggerError,
                               hint="Use a WD14 v3 tagger (model.onnx + selected_tags.csv); v3 needs "
                                    "onnxruntime >= 1.17.",
                               purpose="caption_mode=tags", alternative="set caption_mode=template")
        self.labels = read_labels(folder_or_files[LABELS_FILE])
        self.size = self.model.dim(1, DEFAULT_SIZE)  # NHWC
        self.name = self.model.name

    def probabilities(self, images: list[Image.Image]) -> np.ndarray:
        chunk = BATCH if self.model.batched else 1
        out = [self.model.run(np.stack([prepare(im, self.size) for im in images[i:i + chunk]]))
               for i in range(0, len(images), chunk)]
        probs = np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.labels)), np.float32)
        if probs.shape[1] != len(self.labels):
            raise TaggerError(f"tagger_model {self.model.path}: the model gives {probs.shape[1]} tags but "
                              f"{LABELS_FILE} lists {len(self.labels)}; use the two files of the same model.")
        return probs

    def detect(self, images: list[Image.Image], general: float, character: float) -> list[dict[str, float]]:
        """Per picture, {tag name: probability} of the detected tags, ratings left out, most
        certain first (the caption's 75-token cut then drops the least certain)."""
        thresholds = np.array([character if lab.category == CHARACTER else general for lab in self.labels])
        usable = np.array([lab.category != RATING for lab in self.labels])
        out = []
        for row in self.probabilities(images):
            hits = np.nonzero((row > thresholds) & usable)[0]
            out.append({self.labels[i].name: round(float(row[i]), 4) for i in hits[np.argsort(-row[hits], kind="stable")]})
        return out

    @functools.cached_property
    def categories(self) -> dict[str, int]:
        return {lab.name: lab.category for lab in self.labels}


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """[size, size, 3] float32 BGR 0–255, as the tagger was trained."""
    rgba = image.convert("RGBA")
    side = max(rgba.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgba, ((side - rgba.width) // 2, (side - rgba.height) // 2), mask=rgba)
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def read_labels(path: Path) -> list[Label]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [Label(row["name"], int(row["category"])) for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as e:
        raise TaggerError(f"tagger_model {path}: cannot read it as a WD14 {LABELS_FILE} "
                          f"(tag_id,name,category,count): {e}.") from None


def load_tagger(setting: str) -> Tagger:
    return Tagger(model_files("tagger_model", setting, (MODEL_FILE, LABELS_FILE), TaggerError,
                              offline_hint="set caption_mode=template"))


# The stand-in's tags: (name, category, weights on the mean B, G, R (0..1), bias). Colour picks
# which tags fire, so tests steer the tagger by what they draw.
STAND_IN_TAGS = (
    ("general", RATING, (0, 0, 0), 9.0),
    ("sensitive", RATING, (0, 0, 0), -9.0),
    ("1girl", GENERAL, (0, 0, 0), 9.0),
    ("solo", GENERAL, (0, 0, 0), 3.0),
    ("smile", GENERAL, (0, 0, 0), 0.0),                          # 0.5: in at 0.35, out at 0.6
    ("red_hair", GENERAL, (-20, -20, 40), -2.0),                 # red pictures
    ("long_hair", GENERAL, (-20, -20, 40), -1.0),
    ("blue_eyes", GENERAL, (40, -20, -20), -2.0),                # blue pictures
    ("school_uniform", GENERAL, (-20, 40, -20), -2.0),           # green pictures
    ("^_^", GENERAL, (40, -20, -20), -2.0),
    ("hanatsuki_(dbnb)", CHARACTER, (-20, -20, 40), -6.0),       # only strongly red pictures
    # The views the guide advises against (dbnb.prep.views), each on a colour no other test draws.
    ("from_behind", GENERAL, (-40, 20, 20), -30.0),              # yellow pictures
    ("from_side", GENERAL, (20, 20, -40), -30.0),                # cyan pictures
    ("head_out_of_frame", GENERAL, (20, -40, 20), -30.0),        # magenta pictures
    ("close-up", GENERAL, (-20, -20, -20), 10.0),                # black pictures
)


def write_stand_in_tagger(folder: str | Path, size: int = DEFAULT_SIZE) -> Path:
    """A tiny tagger with the WD14 v3 contract (NHWC BGR 0–255 in, sigmoid per tag out,
    `model.onnx` + `selected_tags.csv`), for tests and the bench: nothing downloaded. Its
    logits are linear in the picture's mean colour (STAND_IN_TAGS). Needs the `onnx` package."""
    import onnx  # lazy: loads onnx
    from onnx import TensorProto, helper  # lazy: loads onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in STAND_IN_TAGS], np.float32).T / 255.0  # [3, tags], from 0–255
    bias = np.array([t[3] for t in STAND_IN_TAGS], np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "w"], ["logit0"]),
         helper.make_node("Add", ["logit0", "b"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["output"])],
        "stand_in_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", len(STAND_IN_TAGS)])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights.flatten().tolist()),
                     helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime since 1.11
    onnx.save(model, str(folder / MODEL_FILE))
    with open(folder / LABELS_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category, _, _) in enumerate(STAND_IN_TAGS):
            writer.writerow([1000 + i, name, category, 100 - i])
    return folder
