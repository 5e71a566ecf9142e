"""An exported .onnx model run by onnxruntime on CPU: the labels and scores predict gives for its checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cnnrnn.errors import UserError

INSTALL = "pip install 'cnnrnn[export]'"


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for the file; a sentence if onnxruntime is missing or the file is not ONNX."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"Running {path} needs the onnxruntime package, which is not installed; install it with "
                        f"{INSTALL}.") from None
    if not Path(path).is_file():
        raise UserError(f"{path} does not exist; give an .onnx file written by python -m cnnrnn.export.")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initializers are not for the user
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, not importable by a stable name
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable ONNX model ({reason}); export it again with "
                        f"python -m cnnrnn.export CKPT {Path(path).name}.") from None


class OnnxModel:
    """A file written by cnnrnn.export: its metadata (kind, classes, side, threshold) and predict()."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if not meta.get("format", "").startswith("cnnrnn-onnx/"):
            raise UserError(f"{path} is an ONNX model but not one written by cnnrnn (no cnnrnn metadata); export "
                            f"a checkpoint with python -m cnnrnn.export CKPT OUT.onnx.")
        self.kind = meta["kind"]
        self.classes = json.loads(meta["classes"])
        self.side = json.loads(meta["input"])["side"]
        self.threshold = json.loads(meta.get("threshold", "0.5"))
        self.config = json.loads(meta["config"])
        self.multiset = meta.get("target") == "multiset"  # files from before multiset mode name sets
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's outputs by name for uint8 images (B, side, side)."""
        feed = {"images": np.ascontiguousarray(images.numpy(), dtype=np.uint8)}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def predict(self, images: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Label indices (in emission order for the decoder) and per-class scores, as predict.predict."""
        out = self.run(images)
        scores = torch.from_numpy(out["scores"])
        if self.kind == "single":
            return [[int(i)] for i in scores.argmax(dim=1)], scores
        if self.kind == "bce":
            return [row.nonzero().flatten().tolist() for row in scores >= self.threshold], scores
        end = len(self.classes)
        return [[int(t) for t in row if t < end] for row in out["tokens"]], scores
