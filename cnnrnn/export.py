"""Export a checkpoint to ONNX: python -m cnnrnn.export CKPT OUT.onnx [--opset N].

The graph reads what predict reads: a uint8 batch (B, H, W) of gray images, light items on black, 28 pixels
square for a single-label model and grid x 28 for a multi-label one; it scales the pixels itself (as
tasks.to_input does), so an ONNX user feeds raw pixels. Outputs: `logits` and `scores` (softmax) for lstm and
cnn, `scores` (sigmoids) for the BCE head, `tokens` (B, max_labels + 1; END-padded, greedy) and `scores` for
the decoder. The batch size is free. metadata_props carry the class names, the input convention, the
checkpoint's config and the BCE threshold, so the .onnx file needs nothing beside it.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from cnnrnn import build
from cnnrnn.cli import fail, writable_file
from cnnrnn.data.fashion_mnist import CLASSES, SIDE
from cnnrnn.engine import load_checkpoint
from cnnrnn.errors import UserError
from cnnrnn.tasks import MEAN, STD, to_input

log = logging.getLogger("cnnrnn")

FORMAT = "cnnrnn-onnx/1"
DEFAULT_OPSET = 17  # read by every onnxruntime of the last years
OPSETS = range(11, 21)  # the TorchScript exporter writes up to 20; below 11, some ops here may have no form
INSTALL = "pip install 'cnnrnn[export]'"


class Classifier(nn.Module):
    """lstm / cnn: uint8 images -> logits of the image as given, and softmax scores (flip-averaged with tta,
    as tasks.Classification.predict)."""

    def __init__(self, model: nn.Module, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_input(images)
        logits = self.model(x)
        scores = logits.softmax(dim=1)
        if self.tta:
            scores = (scores + self.model(x.flip(-1)).softmax(dim=1)) / 2
        return logits, scores


class Sigmoid(nn.Module):
    """cnn_bce: uint8 images -> per-class sigmoid scores (flip-averaged with tta, as tasks.MultiLabelBCE)."""

    def __init__(self, model: nn.Module, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_input(images)
        scores = self.model(x).sigmoid()
        return (scores + self.model(x.flip(-1)).sigmoid()) / 2 if self.tta else scores


class GreedyDecoder(nn.Module):
    """cnn_rnn: CNNRNN._greedy unrolled over a fixed `limit` + 1 steps (one label per cell of the exported
    size) with tensor ops only, so the graph has no loop: a finished image keeps emitting END with its scores
    frozen, which is what the early stop in _greedy leaves too. Outputs tokens (B, T) (END-padded, emission
    order) and scores (B, C)."""

    def __init__(self, model: nn.Module, tta: bool, limit: int | None = None):
        super().__init__()
        self.model, self.tta, self.limit = model, tta, limit or model.max_labels

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        c, end = m.num_classes, m.end
        feats, keys, state, read = m.encode(to_input(images), self.tta)
        b = images.shape[0]  # a traced size, not len(): the batch stays free in the graph
        tokens = torch.full((b,), m.start, dtype=torch.long)
        emitted = torch.zeros(b, c, dtype=torch.bool)
        done = torch.zeros(b, dtype=torch.bool)
        scores = torch.zeros(b, c)
        classes = torch.arange(c)
        end_only = torch.cat([torch.zeros(b, c, dtype=torch.bool), torch.ones(b, 1, dtype=torch.bool)], dim=1)
        out = []
        for t in range(self.limit + 1):
            logits, state, _ = m.step(tokens, state, feats, keys, read)
            probs = logits.softmax(dim=1)
            scores = torch.where(done[:, None], scores, torch.maximum(scores, probs[:, :c]))
            # no label twice (multiset: any label); once `limit` labels are out, only END (CNNRNN._allowed)
            fresh = torch.ones_like(emitted) if m.multiset else ~emitted
            allowed = end_only if t >= self.limit else torch.cat([fresh, end_only[:, c:]], dim=1)
            tokens = logits.masked_fill(~allowed, float("-inf")).argmax(dim=1)
            tokens = torch.where(done, torch.full_like(tokens, end), tokens)
            emitted = emitted | (tokens[:, None] == classes)       # (B, 1) == (C,) -> (B, C); END matches none
            done = done | (tokens == end)
            out.append(tokens)
        return torch.stack(out, dim=1), scores


def graph(cfg, model: nn.Module) -> tuple[nn.Module, list[str]]:
    """The module to export for this config's model, and its output names."""
    tta = cfg.eval.tta
    if cfg.kind == "single":
        return Classifier(model, tta).eval(), ["logits", "scores"]
    if cfg.kind == "bce":
        return Sigmoid(model, tta).eval(), ["scores"]
    if model.beam_size > 1:
        log.warning("model.beam_size=%d: the exported graph decodes greedily (beam search has data-dependent "
                    "control flow); its labels can differ from the checkpoint's beam search", model.beam_size)
    return GreedyDecoder(model, tta, cfg.data.test_grid ** 2).eval(), ["tokens", "scores"]


def model_target(cfg) -> str:
    return cfg.model.get("target", "set")


def side(cfg) -> int:
    """Image side in pixels: one item, or a grid of them."""
    return SIDE if cfg.kind == "single" else SIDE * cfg.data.test_grid


def metadata(cfg, state: dict, outputs: list[str]) -> dict[str, str]:
    """Everything an ONNX user needs beside the graph, as string key/values for metadata_props."""
    n = side(cfg)
    meaning = {"logits": "(batch, classes) float: the model's logits for the image as given",
               "scores": {"single": "(batch, classes) float: softmax probabilities; the label is the argmax",
                          "bce": "(batch, classes) float: sigmoid probabilities; labels are the classes with "
                                 "score >= threshold",
                          "sequence": "(batch, classes) float: each class's highest probability over the "
                                      "decoding steps"}[cfg.kind],
               "tokens": f"(batch, {cfg.data.test_grid ** 2 + 1}) int64: greedy decoding, class indices in emission "
                         f"order, then {len(CLASSES)} (END) to the end"}
    meta = {
        "format": FORMAT,
        "kind": cfg.kind,
        "task": cfg.task,
        "classes": json.dumps(list(state.get("classes", CLASSES))),
        "input": json.dumps({
            "name": "images", "dtype": "uint8", "shape": ["batch", n, n], "side": n,
            "pixels": "8-bit gray, light item on black, as in Fashion-MNIST"
                      + ("" if cfg.kind == "single" else f"; a {cfg.data.test_grid}x{cfg.data.test_grid} grid of 28x28 cells"),
            "scaling": f"inside the graph: (pixel / 255 - {MEAN}) / {STD}"}),
        "outputs": json.dumps({name: meaning[name] for name in outputs}),
        # eval.tta: exported too, as the checkpoint predicts (the flips are one tensor op in the graph)
        "tta": "true: scores (the decoder: its features) average each image with its mirror image" if cfg.eval.tta
               else "false",
        "config": json.dumps(state["config"]),
    }
    if cfg.kind == "bce":
        meta["threshold"] = json.dumps(float((state.get("task_state") or {}).get("threshold", 0.5)))
    if cfg.kind == "sequence":
        meta["target"] = model_target(cfg)
        meta["decoding"] = (f"greedy, {cfg.data.test_grid ** 2 + 1} steps, "
                            + ("one label per item" if model_target(cfg) == "multiset" else "no label twice"))
    return meta


def need_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"Exporting needs the onnx package, which is not installed; install it with "
                        f"{INSTALL}.") from None
    return onnx


def export(module: nn.Module, outputs: list[str], path: str | Path, image_side: int, meta: dict[str, str],
           opset: int = DEFAULT_OPSET) -> Path:
    """Write `module` (uint8 images (B, side, side) -> outputs) as an ONNX file with `meta` in metadata_props."""
    onnx = need_onnx()
    path = Path(path)
    example = torch.zeros(2, image_side, image_side, dtype=torch.uint8)
    axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the torch.export one, which needs onnxscript as
        # well; these graphs have no data-dependent control flow, so tracing them is exact: the notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        # about LSTMs whose initial state has the example's batch size; ours start from zeros of the input's
        # batch, and the tests run the graph at other batch sizes
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # nn.LSTM's checks of the input's size
        buffer = io.BytesIO()
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["images"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset)
    proto = onnx.load_model_from_string(buffer.getvalue())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cnnrnn {meta.get('task', '')} model; see metadata_props for the input and outputs"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(path))
    except OSError as exc:  # checked up front; the disk can still fill
        raise UserError(f"{path} could not be written ({exc.strerror or type(exc).__name__}); choose another "
                        f"path, or free some space.") from None
    return path


def export_checkpoint(ckpt: str | Path, out: str | Path, opset: int = DEFAULT_OPSET) -> tuple[Path, str]:
    """Export a checkpoint (or run dir) to `out`: the path written, and a note on onnxruntime's agreement."""
    if not str(out).endswith(".onnx"):
        raise UserError(f"{out} does not end in .onnx; name the output file OUT.onnx.")
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is outside what this exporter writes; choose {OPSETS[0]} to "
                        f"{OPSETS[-1]} (default {DEFAULT_OPSET}).")
    if str(ckpt).lower().endswith(".onnx"):
        raise UserError(f"{ckpt} is already an exported ONNX model; give the checkpoint it came from "
                        f"(RUN_DIR/checkpoints/best.pt).")
    writable_file(str(out), str(out), "model.onnx", make_folder=True)
    need_onnx()  # before any work
    state = load_checkpoint(ckpt)
    cfg, model, task = build.from_checkpoint(state, ckpt)
    module, outputs = graph(cfg, model)
    path = export(module, outputs, out, side(cfg), metadata(cfg, state, outputs), opset)
    return path, self_check(path, side(cfg), model, task)


def self_check(path: Path, image_side: int, model: nn.Module, task) -> str:
    """How onnxruntime's labels and scores compare with PyTorch's on random pixels (a note; none without it)."""
    from cnnrnn import exported

    try:
        onnx_model = exported.OnnxModel(path)
    except UserError as exc:
        return f"not checked ({exc})"
    images = torch.randint(0, 256, (8, image_side, image_side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = task.predict(model, {"image": images})
    labels, scores = onnx_model.predict(images)
    same = "the same labels" if labels == task.labels(out) else "DIFFERENT labels"
    return f"onnxruntime vs PyTorch on 8 random images: {same}, scores within " \
           f"{(scores - out['scores']).abs().max().item():.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.export", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint written by cnnrnn.train (RUN_DIR/checkpoints/best.pt) or a run dir")
    parser.add_argument("out", help="the ONNX file to write (OUT.onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path, note = export_checkpoint(args.ckpt, args.out, args.opset)
    except UserError as exc:
        fail(str(exc))
    log.info("wrote %s (%.1f MB); %s", path, path.stat().st_size / 1e6, note)


if __name__ == "__main__":
    main()
