"""The one onnxruntime runner for dbnb's anime ONNX models: skytnt's anime-segmentation
(`dbnb.prep.segment`), the WD14 tagger (`dbnb.prep.tagger`) and deepghs' CCIP (`dbnb.evaluate.scorers.ccip`).

Each model's module knows its own contract (pre-processing, what the outputs mean); this one
finds the model's files (a local file or folder, or a Hub repo downloaded into dbnb's cache),
opens the session on the best provider and names what a cached result depends on. Errors are
raised as the calling module's own error class, naming its setting.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from dbnb.core.errors import DbnbError
from dbnb.core.platform import default_cache_dir

INSTALL = "pip install 'dbnb[prep]' (onnxruntime-gpu on a GPU machine)"


class OnnxModelError(DbnbError, RuntimeError):
    """An ONNX model cannot be found or loaded; the message names the setting and the fix."""


def providers(ort) -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, else CPU (never TensorRT: it compiles for minutes)."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def import_onnxruntime(purpose: str, alternative: str = "", error: type = OnnxModelError):
    """onnxruntime, or `error` saying what needs it and what else the user can do."""
    try:
        import onnxruntime  # lazy: optional onnxruntime
    except ImportError:
        raise error(f"{purpose} needs onnxruntime: {INSTALL}" + (f", or {alternative}" if alternative else "")
                    + ".") from None
    return onnxruntime


def fingerprint(path: Path) -> str:
    """What a cached result depends on: the model file's content, cheaply (size + head)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return f"{path.name}:{path.stat().st_size}:{hashlib.sha1(head).hexdigest()[:10]}"


class OnnxModel:
    """One inference session. `run(array)` feeds the first input and returns the first output."""

    def __init__(self, path: str | Path, setting: str, error: type = OnnxModelError, hint: str = "",
                 purpose: str = "", alternative: str = "", session_providers: list[str] | None = None):
        ort = import_onnxruntime(purpose or setting, alternative, error)
        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=session_providers or providers(ort))
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise error(f"{setting} {self.path}: onnxruntime cannot load it ({e}). {hint}".strip()) from None
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.output_name = self.session.get_outputs()[0].name
        self.name = fingerprint(self.path)

    def dim(self, axis: int, default: int) -> int:
        """A fixed size of the input (symbolic dimensions read as `default`)."""
        value = self.input_shape[axis]
        return value if isinstance(value, int) and value > 0 else default

    @property
    def batched(self) -> bool:
        """Whether the first input dimension takes any batch size (else one picture per run)."""
        return not (isinstance(self.input_shape[0], int) and self.input_shape[0] > 0)

    def run(self, array: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(array)})[0]


def model_files(setting: str, value: str, files: tuple[str, ...], error: type = OnnxModelError,
                default_subfolder: str = "", offline_hint: str = "") -> dict[str, Path]:
    """Where each of `files` is. `value` is a local folder holding them (or, for a one-file
    model, the file itself), a Hub repo id `owner/name`, or `owner/name/subfolder` for repos
    that keep several models (CCIP). Hub files go into dbnb's cache; when they cannot be
    fetched (offline, typo), the error says how to use a local copy instead."""
    local = Path(value).expanduser()
    if local.is_file() and len(files) == 1:
        return {files[0]: local}
    if local.is_dir():
        missing = [f for f in files if not (local / f).is_file()]
        if missing:
            raise error(f"{setting} {local} is a folder without {', '.join(missing)} (it needs "
                        f"{', '.join(files)}).")
        return {f: local / f for f in files}
    parts = value.strip("/").split("/")
    if len(parts) not in (2, 3) or value.endswith(".onnx") or not all(parts):
        raise error(f"{setting} {value!r} is neither an existing local model nor a Hub repo id like "
                    f"'owner/name'. Check the path (on Colab: is Drive mounted?).")
    repo, subfolder = "/".join(parts[:2]), parts[2] if len(parts) == 3 else default_subfolder
    from huggingface_hub import hf_hub_download  # lazy: loads huggingface_hub

    found = {}
    for f in files:
        name = f"{subfolder}/{f}" if subfolder else f
        try:
            found[f] = Path(hf_hub_download(repo, name, cache_dir=default_cache_dir() / "hub"))
        except Exception as e:  # noqa: BLE001 — offline, 404, auth: the advice is the same
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise error(f"{setting} {value!r}: cannot download {name} from the Hugging Face Hub ({first}). "
                        f"Download {', '.join(files)} once into a folder and set {setting}=/path/to/that/folder"
                        + (f", or {offline_hint}" if offline_hint else "") + ".") from None
    return found
