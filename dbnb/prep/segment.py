"""Background removal with skytnt's anime-segmentation (ISNet, `isnetis.onnx`).

The model's contract, followed exactly (its reference `get_mask`): the picture scaled so its
long side is 1024, centred on a black 1024² square, RGB/255 as float32 [1, 3, 1024, 1024]
named `img`; the output `mask` [1, 1, 1024, 1024] is already a sigmoid (0..1). The square's
padding is cut off again and the mask scaled back to the picture's size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from dbnb.core.onnx import OnnxModel, OnnxModelError, model_files

MODEL_FILE = "isnetis.onnx"
DEFAULT_SIZE = 1024


class SegmenterError(OnnxModelError):
    """The segmentation model cannot be loaded; the message names the setting and the fix."""


class Segmenter:
    """`segmenter(rgb) -> mask` ("L", same size as the picture, 255 = character)."""

    def __init__(self, model_path: str | Path, providers: list[str] | None = None):
        self.model = OnnxModel(model_path, "segmentation_model", SegmenterError,
                               hint=f"Use {MODEL_FILE} from the skytnt/anime-seg repo.",
                               purpose="Background removal", alternative="set remove_background=false",
                               session_providers=providers)
        self.input_name, self.name = self.model.input_name, self.model.name
        self.size = self.model.dim(-1, DEFAULT_SIZE)

    def __call__(self, rgb: Image.Image) -> Image.Image:
        batch, (top, left, h, w) = letterbox(rgb, self.size)
        out = self.model.run(batch)
        mask = np.asarray(out, dtype=np.float32).reshape(out.shape[-2:])[top:top + h, left:left + w]
        mask = Image.fromarray(np.ascontiguousarray(mask)).resize(rgb.size, Image.Resampling.BILINEAR)
        return Image.fromarray((np.clip(np.asarray(mask), 0, 1) * 255 + 0.5).astype(np.uint8))


def letterbox(rgb: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """[1, 3, size, size] float32 and where the picture sits in it (top, left, h, w)."""
    w0, h0 = rgb.size
    h, w = (size, max(1, int(size * w0 / h0))) if h0 > w0 else (max(1, int(size * h0 / w0)), size)
    top, left = (size - h) // 2, (size - w) // 2
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    small = rgb.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    canvas[top:top + h, left:left + w] = np.asarray(small, dtype=np.float32) / 255.0
    return canvas.transpose(2, 0, 1)[None], (top, left, h, w)


def composite(rgb: Image.Image, mask: Image.Image, background: str) -> Image.Image:
    """The character over the background colour, the mask's soft edge kept as blending."""
    bg = Image.new("RGB", rgb.size, ImageColor.getrgb(background)[:3])
    return Image.composite(rgb.convert("RGB"), bg, mask)


def model_path(setting: str) -> Path:
    """`segmentation_model`: a local .onnx, a folder holding isnetis.onnx, or a Hub repo id."""
    return model_files("segmentation_model", setting, (MODEL_FILE,), SegmenterError,
                       offline_hint="set remove_background=false")[MODEL_FILE]


def load_segmenter(setting: str) -> Segmenter:
    return Segmenter(model_path(setting))


def write_stand_in_model(path: str | Path, size: int = DEFAULT_SIZE, strength: float = 20.0) -> Path:
    """A tiny ONNX model with isnetis.onnx's input / output contract, for tests and the bench
    (nothing downloaded): mask = sigmoid(strength * (R - G)), so red is character, green is
    background. Needs the `onnx` package."""
    import onnx  # lazy: loads onnx
    from onnx import TensorProto, helper  # lazy: loads onnx

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [strength, -strength, 0.0])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["img", "w"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["mask"])],
        "stand_in_isnetis",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, size, size])],
        initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime since 1.11
    onnx.save(model, str(path))
    return Path(path)
