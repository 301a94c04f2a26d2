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
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dbnb.onnxrun import OnnxModel, OnnxModelError, model_files

FEATURES, METRICS, THRESHOLD = "model_feat.onnx", "model_metrics.onnx", "metrics.json"
FILES = (FEATURES, METRICS, THRESHOLD)
DEFAULT_MODEL = "ccip-caformer-24-randaug-pruned"
DEFAULT_SIZE = 384
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
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
    return ((array - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)).transpose(2, 0, 1)


def load_ccip(setting: str) -> CCIP:
    return CCIP(model_files("ccip_model", setting, FILES, CCIPError, default_subfolder=DEFAULT_MODEL,
                            offline_hint="set score_with=clip"))


def fidelity(ccip: CCIP, generated: np.ndarray, instance: np.ndarray) -> tuple[float, float]:
    """(share of (generated, instance picture) pairs judged the same character, mean difference)."""
    if not len(generated) or not len(instance):
        return float("nan"), float("nan")
    diff = ccip.differences(generated, instance)
    return float((diff <= ccip.threshold).mean()), float(diff.mean())


def write_stand_in_ccip(folder: str | Path, size: int = DEFAULT_SIZE, threshold: float = 0.1) -> Path:
    """A tiny CCIP with the real models' contract (the three files, the same inputs and
    outputs), for tests and benches: nothing downloaded. Its features are the mean colour of a
    4x4 grid; its difference is the cosine distance. Needs the `onnx` package."""
    import onnx
    from onnx import TensorProto, helper

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
