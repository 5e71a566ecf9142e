"""Predictions of a trained model, from a checkpoint (PyTorch) or an .onnx file written by cnnrnn.export
(onnxruntime on CPU): the same label logic for both, the task's own (tasks.py)."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnrnn import build, checkpoint
from cnnrnn.config import from_dict
from cnnrnn.data.items import Format
from cnnrnn.errors import UserError
from cnnrnn.ranks import pick_device
from cnnrnn.tasks import make_task

INSTALL = "pip install 'cnnrnn[export]'"
ONNX_FORMAT = "cnnrnn-onnx/3"


@dataclass
class Predictor:
    infer: Callable          # uint8 pictures (B, C, H, W) -> (label indices per picture, scores (B, K))
    side: int                # the side of the pictures it was trained on
    fmt: Format              # what its items are: class names, size, channels, background
    composite: bool = False  # reads any picture of cells of the item size (a checkpoint's composite model)
    multiset: bool = False   # names one label per item: print counts

    @property
    def classes(self) -> tuple[str, ...]:
        return self.fmt.classes


def load(path: str, device: str = "cpu", max_items: int | None = None, threshold: float | None = None) -> Predictor:
    """The model of a checkpoint or an exported .onnx file; `max_items` caps the decoder's labels, `threshold` sets
    the BCE head's."""
    if path.lower().endswith(".onnx"):
        if device == "cuda":
            raise UserError(f"{path} runs in onnxruntime on the CPU only; drop --device cuda, or give its checkpoint.")
        if max_items is not None:
            raise UserError(f"--max-items needs a checkpoint; {path} decodes its exported number of steps.")
        m = OnnxModel(path)
        tune(m.task, f"{path} holds a task={m.config['task']} model", None, threshold)
        return Predictor(m.predict, m.side, m.task.fmt, False, m.task.multiset)
    cfg, model, task = build.from_checkpoint(checkpoint.load(path), path, pick_device(device, "--device "))
    tune(task, f"{path} holds a task={cfg.task} model", max_items, threshold)

    def infer(images: torch.Tensor):
        out = task.predict(model, {"image": images.to(next(model.parameters()).device)})
        return task.labels(out), out["scores"].float().cpu()

    return Predictor(infer, task.side(cfg), task.fmt, task.composite, task.multiset)


def tune(task, holds: str, max_items: int | None, threshold: float | None) -> None:
    """--max-items for the decoder, --threshold for the BCE head; a sentence for either on another model."""
    if max_items is not None:
        if not task.takes_max_items:
            raise UserError(f"--max-items caps the label decoder, but {holds}; drop it.")
        if max_items < 1:
            raise UserError(f"--max-items {max_items} must be at least 1.")
        task.max_items = max_items
    if threshold is not None:
        if not task.tunes:
            raise UserError(f"--threshold sets the BCE head's, but {holds}; drop it.")
        task.threshold = threshold


def onnx_session(path: str | Path, threads: int | None = None):
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
    """A file written by cnnrnn.export: its metadata, checked field by field, and predict()."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = onnx_session(path, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        if not meta.get("format", "").startswith("cnnrnn-onnx/"):
            raise UserError(f"{path} is an ONNX model but not one written by cnnrnn (no cnnrnn metadata); export "
                            f"a checkpoint with python -m cnnrnn.export CKPT OUT.onnx.")
        try:
            if meta["format"] != ONNX_FORMAT:
                raise ValueError(f"format {meta['format']}")
            self.config, state = json.loads(meta["config"]), json.loads(meta["task_state"])
            fmt, self.side = Format.from_dict(json.loads(meta["data"])), int(json.loads(meta["input"])["side"])
            if not isinstance(state, dict):
                raise TypeError("task_state")
            cfg = from_dict(self.config)
        except (KeyError, ValueError, TypeError, UserError) as exc:
            raise UserError(f"{path} carries cnnrnn metadata that this version cannot use ({exc}); export its "
                            f"checkpoint again with python -m cnnrnn.export CKPT OUT.onnx.") from None
        self.task = make_task(cfg, fmt, state=state)
        self.outputs = [o.name for o in self.session.get_outputs()]
        graph = [(i.name, i.type, i.shape[1:]) for i in self.session.get_inputs()]
        if graph != [("images", "tensor(uint8)", [fmt.channels, self.side, self.side])] or set(self.outputs) != set(
                self.task.outputs):
            raise UserError(f"{path}'s graph does not match its metadata (it reads {graph} and gives {self.outputs}, "
                            f"where its metadata says uint8 pictures of {fmt.channels}x{self.side}x{self.side} and "
                            f"{list(self.task.outputs)}); export its checkpoint again.")

    def run(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's outputs by name for uint8 pictures (B, C, side, side)."""
        feed = {"images": np.ascontiguousarray(images.numpy(), dtype=np.uint8)}
        return dict(zip(self.outputs, self.session.run(None, feed)))

    def predict(self, images: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
        """Label indices (in emission order for the decoder) and per-class scores, as a checkpoint gives them."""
        out = {k: torch.from_numpy(v) for k, v in self.run(images).items()}
        return self.task.labels(out), out["scores"].float()
