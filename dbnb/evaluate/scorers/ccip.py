"""CCIP: deepghs' contrastive anime character model — "is this the same character?".

The contract of the `deepghs/ccip_onnx` models, as their reference code uses them
(deepghs/imgutils, `imgutils/metrics/ccip.py`: `_preprocess_image`, `ccip_batch_extract_features`,
`ccip_batch_differences`, `ccip_default_threshold`; facts taken over, not its code):

- `<model>/model_feat.onnx`: input `input` [N, 3, 384, 384] — the picture as RGB
  (transparency on white, imgutils' `load_image` default), resized (bilinear, the whole
  picture squeezed, no crop) to 384², /255, normalised with CLIP's mean and std; output
  `output` [N, 768] features.
- `<model>/model_metrics.onnx`: input `input` [N, 768] (features stacked), output `output`
  [N, N] pairwise differences (small = same character).
- `<model>/metrics.json`: `threshold` — two pictures show the same character when their
  difference is at most it (≈ 0.178 for the default `ccip-caformer-24-randaug-pruned`).

`ccip_model` is the Hub repo (`deepghs/ccip_onnx`, its default model), `owner/repo/<model>`
for another of its models, or a local folder holding the three files.

`CcipScorer` is `score_with=ccip` (anime characters): fidelity = the share of (fidelity image,
instance picture) pairs that CCIP judges the same character, flexibility = tag adherence, the
share of the flexibility prompts' asked-for tags ("school uniform", "beach") that the WD14
tagger finds in their images.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dbnb.core.onnx import OnnxModel, OnnxModelError, model_files
from dbnb.evaluate.scorers.base import Panel, Series, Weighed, images_of, row_scores

FEATURES, METRICS, THRESHOLD = "model_feat.onnx", "model_metrics.onnx", "metrics.json"
FILES = (FEATURES, METRICS, THRESHOLD)
DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"
DEFAULT_SIZE = 384
BATCH = 16


class CCIPError(OnnxModelError):
    """The CCIP model cannot be loaded; the message names `ccip_model` and the fix."""


class CCIP:
    """`features(images)` -> [N, D]; `differences(a, b)` -> [len(a), len(b)]; `threshold`."""

    def __init__(self, files: dict[str, Path]):
        opts = dict(setting="ccip_model", error=CCIPError, purpose="score_with=ccip",
                    alternative="set score_with=clip",
                    hint=f"Use {FEATURES} and {METRICS} of one deepghs/ccip_onnx model.")
        self.feature_model, self.metric_model = OnnxModel(files[FEATURES], **opts), OnnxModel(files[METRICS], **opts)
        try:
            self.threshold = float(json.loads(Path(files[THRESHOLD]).read_text(encoding="utf-8"))["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CCIPError(f"ccip_model {files[THRESHOLD]}: cannot read the model's threshold ({e}).") from None
        self.size = self.feature_model.dim(-1, DEFAULT_SIZE)
        self.name = self.feature_model.name

    def features(self, images: list[Image.Image]) -> np.ndarray:
        chunk = BATCH if self.feature_model.batched else 1
        out = [self.feature_model.run(np.stack([prepare(im, self.size) for im in images[i:i + chunk]]))
               for i in range(0, len(images), chunk)]
        return np.concatenate(out).astype(np.float32)

    def differences(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The model's own metric over (a, b) pairs: it takes all features at once."""
        both = self.metric_model.run(np.concatenate([a, b]).astype(np.float32))
        return np.asarray(both, np.float32)[:len(a), len(a):]


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """[3, size, size] float32, as the CCIP models were trained."""
    rgba = image.convert("RGBA")
    rgb = Image.new("RGB", rgba.size, (255, 255, 255))
    rgb.paste(rgba, mask=rgba)
    array = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # lazy: loads transformers

    mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)


def load_ccip(setting: str) -> CCIP:
    return CCIP(model_files("ccip_model", setting, FILES, CCIPError, default_subfolder=DEFAULT_MODEL,
                            offline_hint="set score_with=clip"))


def fidelity(ccip: CCIP, generated: np.ndarray, instance: np.ndarray) -> tuple[float, float]:
    """(share of (generated, instance picture) pairs judged the same character, mean difference)."""
    if not len(generated) or not len(instance):
        return float("nan"), float("nan")
    diff = ccip.differences(generated, instance)
    return float((diff <= ccip.threshold).mean()), float(diff.mean())


# --- the scorer (score_with=ccip) ------------------------------------------------------------------

COLUMNS = ("checkpoint", "step", "ccip", "ccip_difference", "tag_adherence", "class_ccip")
WEIGHED = Weighed("ccip", "tag_adherence",
                  "CCIP (share of (test image, instance picture) pairs judged the same character)", "tag adherence")
PANELS = (Panel("CCIP (share judged the same)", (Series("ccip", "CCIP same character", "#1f77b4"),
                                                 Series("class_ccip", "class images as character", "#d62728"))),
          Panel("tag adherence (share found)", (Series("tag_adherence", "tag adherence", "#2ca02c"),)))


def asked_tags(prompt: str, fidelity_prompts: list[str], vocabulary) -> list[str]:
    """The tagger names of what a flexibility prompt asks for beyond the fidelity prompts
    ("…, 1girl, solo, school uniform, classroom" → school_uniform, classroom): its
    comma-separated parts that are tagger tags and in no fidelity prompt."""
    def names(text):
        return [" ".join(t.split()).lower().replace(r"\(", "(").replace(r"\)", ")").replace(" ", "_")
                for t in text.split(",")]
    common = {n for f in fidelity_prompts for n in names(f)}
    return [n for n in dict.fromkeys(names(prompt)) if n in vocabulary and n not in common]


def tag_adherence(tagger, images: list[tuple[str, Image.Image]], fidelity_prompts: list[str], config) -> float:
    """Share of (flexibility image, asked-for tag) pairs in which the tagger finds the tag."""
    asked = [asked_tags(text, fidelity_prompts, tagger.categories) for text, _ in images]
    if not any(asked):
        return math.nan
    found = tagger.detect([im for _, im in images], config.tag_threshold, config.character_tag_threshold)
    hits = [tag in tags for wanted, tags in zip(asked, found) for tag in wanted]
    return sum(hits) / len(hits)


def ccip_table(samples, instance: list[Image.Image], ccip: CCIP, tagger, config) -> list[dict]:
    """CCIP fidelity per row (and of the class-prompt images: the class word turning into the
    character), tag adherence of the flexibility images."""
    reference = ccip.features(instance)
    fidelity_texts = [p.text for p in samples.prompts if p.kind == "fidelity"]
    rows = []
    for row in samples.rows:
        same, diff = fidelity(ccip, ccip.features([im for _, im in images_of(samples, row, "fidelity")]), reference)
        klass = [im for _, im in images_of(samples, row, "class")]
        flex = [(p.text, im) for p, im in images_of(samples, row, "flexibility")]
        rows.append(row_scores(row, ccip=same, ccip_difference=diff,
                               tag_adherence=tag_adherence(tagger, flex, fidelity_texts, config) if flex else math.nan,
                               class_ccip=fidelity(ccip, ccip.features(klass), reference)[0] if klass else math.nan))
    return rows


@dataclass(frozen=True)
class CcipScorer:
    ccip: CCIP
    tagger: object  # dbnb.prep.tagger's tagger; None without flexibility prompts
    config: object
    columns = COLUMNS
    weighed = WEIGHED
    panels = PANELS

    @classmethod
    def load(cls, config) -> "CcipScorer":
        """Both models loaded now: `dbnb score` does so before any test image is made, so a
        missing model is said at once."""
        from dbnb.prep.tagger import load_tagger  # lazy: loads torch

        return cls(load_ccip(config.ccip_model),
                   load_tagger(config.tagger_model) if config.test_flexibility_prompts else None, config)

    def table(self, samples, instance: list[Image.Image]) -> list[dict]:
        return ccip_table(samples, instance, self.ccip, self.tagger, self.config)


def write_stand_in_ccip(folder: str | Path, size: int = DEFAULT_SIZE, threshold: float = 0.1) -> Path:
    """A tiny CCIP with the real models' contract (the three files, the same inputs and
    outputs), for tests and benches: nothing downloaded. Its features are the mean colour of a
    4x4 grid; its difference is the cosine distance. Needs the `onnx` package."""
    import onnx  # lazy: loads onnx
    from onnx import TensorProto, helper  # lazy: loads onnx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cell = size // 4
    feat = helper.make_graph(
        [helper.make_node("AveragePool", ["input"], ["grid"], kernel_shape=[cell, cell], strides=[cell, cell]),
         helper.make_node("Flatten", ["grid"], ["output"], axis=1)],
        "stand_in_ccip_feat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 48])])
    metric = helper.make_graph(
        [helper.make_node("LpNormalization", ["input"], ["unit"], axis=1, p=2),
         helper.make_node("Transpose", ["unit"], ["unit_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["unit", "unit_t"], ["similarity"]),
         helper.make_node("Sub", ["one", "similarity"], ["output"])],
        "stand_in_ccip_metrics",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 48])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "N"])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    for graph, name in ((feat, FEATURES), (metric, METRICS)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8  # readable by every onnxruntime since 1.11
        onnx.save(model, str(folder / name))
    (folder / THRESHOLD).write_text(json.dumps({"threshold": threshold}) + "\n", encoding="utf-8")
    return folder
