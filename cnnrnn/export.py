"""Export a checkpoint to ONNX: python -m cnnrnn.export CKPT OUT.onnx [--opset N].

The graph reads what predict reads: a uint8 batch (B, C, H, W) of pictures converted as the training items were
(data.pictures), the item size square for a single-label model and grid x the item size for a multi-label one,
and normalises the pixels itself (Format.to_input): an ONNX user feeds raw pixels. Outputs: `logits` and `scores`
(softmax) for lstm and cnn, `scores` (sigmoids) for the BCE head, `tokens` (B, max_labels + 1; END-padded,
greedy) and `scores` for the decoder. The batch size is free. metadata_props carry the class names, the input
convention, the checkpoint's config, the data's format and the BCE threshold: the file needs nothing beside it.
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

from cnnrnn import build, checkpoint
from cnnrnn.errors import UserError, fail, refusals
from cnnrnn.files import check_writable, write_atomic
from cnnrnn.inference import INSTALL, ONNX_FORMAT, OnnxModel

log = logging.getLogger("cnnrnn")

DEFAULT_OPSET = 17  # read by every onnxruntime of the last years
OPSETS = range(11, 21)  # the TorchScript exporter writes up to 20; below 11, some ops here may have no form


class Exported(nn.Module):
    """uint8 pictures (B, C, side, side) -> the task's predictions, named as in task.outputs: what predict computes
    for a checkpoint, traced (the decoder's own greedy decoding, unrolled over one step per cell and END)."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.task.predict(self.model, {"image": images})
        return tuple(out[name] for name in self.task.outputs)


def metadata(cfg, task) -> dict[str, str]:
    """Everything an ONNX user needs beside the graph, as string key/values for metadata_props."""
    n, f = task.side(cfg), task.fmt
    return {
        "format": ONNX_FORMAT,
        "kind": task.kind,
        "task": cfg.task,
        "classes": json.dumps(list(f.classes)),
        "data": json.dumps(f.to_dict()),
        "input": json.dumps({
            "name": "images", "dtype": "uint8", "shape": ["batch", f.channels, n, n], "side": n,
            "pixels": f"{'gray' if f.channels == 1 else 'RGB'} pictures resized keeping their aspect and padded with "
                      f"the tone {list(f.background)}; cells of {f.size}x{f.size} in reading order for the "
                      f"multi-label models",
            "scaling": f"inside the graph: (pixel / 255 - {list(f.mean)}) / {list(f.std)} per channel"}),
        "outputs": json.dumps(task.outputs),
        # eval.tta: exported too, as the checkpoint predicts (the flips are one tensor op in the graph)
        "tta": "true: scores (the decoder: its features) average each image with its mirror image" if task.tta
               else "false",
        "config": json.dumps(cfg.to_dict()),
        "task_state": json.dumps(task.state()),  # the BCE threshold, the decoder's label order
    }


def need_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError(f"Exporting needs the onnx package, which is not installed; install it with "
                        f"{INSTALL}.") from None
    return onnx


def export(model: nn.Module, task, path: str | Path, image_side: int, meta: dict[str, str],
           opset: int = DEFAULT_OPSET) -> Path:
    """Write the model's predictions (uint8 images (B, side, side) -> task.outputs) as an ONNX file with `meta` in
    metadata_props; atomically, so a failed write leaves the previous file whole."""
    onnx = need_onnx()
    example = torch.zeros(2, task.fmt.channels, image_side, image_side, dtype=torch.uint8)
    outputs = list(task.outputs)
    axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of the torch.export one, which needs onnxscript as
        # well; these graphs have no data-dependent control flow, so tracing them is exact: the notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        # about LSTMs whose initial state has the example's batch size; ours start from zeros of the input's
        # batch, and the tests run the graph at other batch sizes
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks, constant for the exported size
        buffer = io.BytesIO()
        # the wrapper in eval mode: the exporter restores the mode it found, recursively, on the model too
        torch.onnx.export(Exported(model, task).eval(), (example,), buffer, dynamo=False, input_names=["images"],
                          output_names=outputs, dynamic_axes=axes, opset_version=opset)
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = f"cnnrnn {meta.get('task', '')} model; see metadata_props for the input and outputs"
    return write_atomic(path, proto.SerializeToString(), then="free some space or choose another path")


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
    check_writable(str(out), str(out), "model.onnx", make_folder=True)
    need_onnx()  # before any work
    cfg, model, task = build.from_checkpoint(checkpoint.load(ckpt), ckpt)
    if cfg.model.get("beam_size", 1) > 1:
        log.warning("model.beam_size=%d: the exported graph decodes greedily (beam search has data-dependent "
                    "control flow); its labels can differ from the checkpoint's beam search", model.beam_size)
        model.beam_size = 1
    path = export(model, task, out, task.side(cfg), metadata(cfg, task), opset)
    return path, self_check(path, task.side(cfg), model, task)


def self_check(path: Path, image_side: int, model: nn.Module, task) -> str:
    """How onnxruntime's labels and scores compare with PyTorch's on random pixels (a note; none without it)."""
    try:
        onnx_model = OnnxModel(path)
    except UserError as exc:
        return f"not checked ({exc})"
    images = torch.randint(0, 256, (8, task.fmt.channels, image_side, image_side), dtype=torch.uint8,
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
        with refusals():
            path, note = export_checkpoint(args.ckpt, args.out, args.opset)
    except KeyboardInterrupt:
        fail(f"Interrupted; {args.out} was not written (a file that was there is intact).", 130)
    log.info("wrote %s (%.1f MB); %s", path, path.stat().st_size / 1e6, note)


if __name__ == "__main__":
    main()
