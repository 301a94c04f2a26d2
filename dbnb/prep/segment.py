"""Background removal with skytnt's anime-segmentation (ISNet, `isnetis.onnx`).

The model's contract, followed exactly (its reference `get_mask`): the picture scaled so its
long side is 1024, centred on a black 1024² square, RGB/255 as float32 [1, 3, 1024, 1024]
named `img`; the output `mask` [1, 1, 1024, 1024] is already a sigmoid (0..1). The square's
padding is cut off again and the mask scaled back to the picture's size.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from dbnb.errors import DbnbError

MODEL_FILE = "isnetis.onnx"
DEFAULT_SIZE = 1024


class SegmenterError(DbnbError, RuntimeError):
    """The segmentation model cannot be loaded; the message names the setting and the fix."""


class Segmenter:
    """`segmenter(rgb) -> mask` ("L", same size as the picture, 255 = character)."""

    def __init__(self, model_path: str | Path, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SegmenterError("Background removal needs onnxruntime: pip install 'dbnb[prep]' "
                                 "(onnxruntime-gpu on a GPU machine), or set remove_background=false.") from None
        path = Path(model_path)
        try:
            self.session = ort.InferenceSession(str(path), providers=providers or _providers(ort))
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise SegmenterError(f"segmentation_model {path}: onnxruntime cannot load it ({e}). Use "
                                 f"{MODEL_FILE} from the skytnt/anime-seg repo.") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = inp.shape[-1] if isinstance(inp.shape[-1], int) else DEFAULT_SIZE
        # What a cached result depends on: the model file's content, cheaply (size + head).
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        self.name = f"{path.name}:{path.stat().st_size}:{hashlib.sha1(head).hexdigest()[:10]}"

    def __call__(self, rgb: Image.Image) -> Image.Image:
        batch, (top, left, h, w) = letterbox(rgb, self.size)
        out = self.session.run(None, {self.input_name: batch})[0]
        mask = np.asarray(out, dtype=np.float32).reshape(out.shape[-2:])[top:top + h, left:left + w]
        mask = Image.fromarray(np.ascontiguousarray(mask)).resize(rgb.size, Image.Resampling.BILINEAR)
        return Image.fromarray((np.clip(np.asarray(mask), 0, 1) * 255 + 0.5).astype(np.uint8))


def _providers(ort) -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU (never TensorRT: it compiles for minutes)."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


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
    local = Path(setting).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / MODEL_FILE).is_file():
            return local / MODEL_FILE
        raise SegmenterError(f"segmentation_model {local} is a folder without {MODEL_FILE}.")
    if setting.count("/") != 1 or setting.endswith(".onnx"):
        raise SegmenterError(f"segmentation_model {setting!r} is neither an existing .onnx file nor a Hub repo "
                             "id like 'skytnt/anime-seg'. Check the path (on Colab: is Drive mounted?).")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(setting, MODEL_FILE))
    except Exception as e:  # noqa: BLE001 — offline, 404, auth: the advice is the same
        raise SegmenterError(f"segmentation_model {setting!r}: cannot download {MODEL_FILE} ({e}). "
                             f"Download it once and set segmentation_model=/path/to/{MODEL_FILE}, "
                             "or set remove_background=false.") from None


def load_segmenter(setting: str) -> Segmenter:
    return Segmenter(model_path(setting))


def write_stand_in_model(path: str | Path, size: int = DEFAULT_SIZE, strength: float = 20.0) -> Path:
    """A tiny ONNX model with isnetis.onnx's input / output contract, for tests and the bench
    (nothing downloaded): mask = sigmoid(strength * (R - G)), so red is character, green is
    background. Needs the `onnx` package."""
    import onnx
    from onnx import TensorProto, helper

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
