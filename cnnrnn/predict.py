"""Name the items in images: python -m cnnrnn.predict CKPT_OR_ONNX IMAGE_OR_DIR ...

One JSON line per image on stdout: {"image": path, "labels": [names], "scores": {name: probability}}; a
multiset model (model.target=multiset) names a class once per item and adds "counts": {name: n}.
The model is a checkpoint, or an .onnx file written by cnnrnn.export (run by onnxruntime on CPU; the same
lines). Images are 8-bit gray, light items on black (RGB is converted), 28 pixels square for a single-label
model; a multi-label checkpoint reads any picture whose sides are multiples of 28 (one item per 28x28 cell,
square or not; the decoder names at most one label per cell, or --max-items), an .onnx file its exported
size. --resize scales other sizes to the size the model was trained on. A bad image is reported on stderr and
skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnrnn import build
from cnnrnn.cli import fail
from cnnrnn.data.fashion_mnist import CLASSES, SIDE
from cnnrnn.engine import load_checkpoint
from cnnrnn.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
BATCH = 256


def image_paths(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named, and image files inside folders named (sorted); a problem per bad input."""
    paths, problems = [], []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS and f.is_file())
            if not found:
                problems.append(f"{p} holds no image files ({', '.join(sorted(EXTENSIONS))}); give a folder of images.")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            problems.append(f"{p} does not exist; give an image file or a folder of images.")
    return paths, problems


def read_image(path: Path, side: int, resize: bool, any_grid: bool = False) -> torch.Tensor:
    """(H, W) uint8, gray, light on black: side x side, or with `any_grid` any multiple of 28 a side."""
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            w, h = img.size
            fits = (w, h) == (side, side) or any_grid and w % SIDE == 0 and h % SIDE == 0 and w and h
            if not fits:
                if not resize:
                    reads = (f"pictures whose sides are multiples of {SIDE} pixels (one item per {SIDE}x{SIDE} cell)"
                             if any_grid else f"{side}x{side}")
                    raise UserError(f"{path} is {w}x{h} pixels, but this model reads {reads}; pass --resize to "
                                    f"scale it to {side}x{side}.")
                img = img.resize((side, side), Image.BILINEAR)
            return torch.from_numpy(np.array(img, dtype=np.uint8))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}); give a PNG or JPEG file.") from None


def predict(model, task, images: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """Label indices (in emission order for the decoder) and per-class scores for uint8 images (B, H, W)."""
    out = task.predict(model, {"image": images})
    return task.labels(out), out["scores"]


@dataclass
class Loaded:
    infer: Callable          # predict()'s function of uint8 images (B, H, W)
    side: int                # the trained picture side (what --resize scales to)
    classes: list[str]
    any_grid: bool = False   # reads any multiple of 28 a side (a checkpoint's composite model)
    multiset: bool = False   # names one label per item: print counts


def load(path: str, max_items: int | None = None) -> Loaded:
    """The model of a checkpoint or an exported .onnx file; `max_items` caps the decoder's labels."""
    if path.lower().endswith(".onnx"):
        from cnnrnn.exported import OnnxModel

        if max_items is not None:
            raise UserError(f"--max-items needs a checkpoint; {path} decodes its exported number of steps.")
        onnx_model = OnnxModel(path)
        return Loaded(onnx_model.predict, onnx_model.side, onnx_model.classes, False, onnx_model.multiset)
    state = load_checkpoint(path)
    cfg, model, task = build.from_checkpoint(state, path)
    if max_items is not None:
        if cfg.kind != "sequence":
            raise UserError(f"--max-items caps the label decoder, but {path} holds a task={cfg.task} model; drop it.")
        if max_items < 1:
            raise UserError(f"--max-items {max_items} must be at least 1.")
        task.max_items = max_items
    side = SIDE if cfg.kind == "single" else SIDE * cfg.data.test_grid
    # both composite models are fully convolutional up to a pooling over (or attention across) the cells
    return Loaded(partial(predict, model, task), side, list(CLASSES), cfg.kind != "single",
                  getattr(task, "multiset", False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint written by cnnrnn.train (single- or multi-label), or an .onnx "
                                     "file written by cnnrnn.export")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--resize", action="store_true", help="scale images of a size the model does not read to "
                                                              "the size it was trained on")
    parser.add_argument("--max-items", type=int, help="decoder only: name at most K items per picture (default: "
                                                      "one per 28x28 cell)")
    args = parser.parse_args(argv)
    try:
        m = load(args.ckpt, args.max_items)
    except UserError as exc:
        fail(str(exc))
    paths, problems = image_paths(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for start in range(0, len(paths), BATCH):
        chunk, images = [], []
        for path in paths[start:start + BATCH]:
            try:
                images.append(read_image(path, m.side, args.resize, m.any_grid))
                chunk.append(path)
            except UserError as exc:
                problems.append(str(exc))
                print(f"error: {exc}", file=sys.stderr)
        records = {}
        for shape in dict.fromkeys(img.shape for img in images):  # one forward pass per picture size
            at = [i for i, img in enumerate(images) if img.shape == shape]
            labels, scores = m.infer(torch.stack([images[i] for i in at]))
            for i, idx, row in zip(at, labels, scores):
                records[i] = {"image": str(chunk[i]), "labels": [m.classes[j] for j in idx],
                              "scores": {c: round(float(s), 6) for c, s in zip(m.classes, row)}}
                if m.multiset:
                    records[i]["counts"] = dict(Counter(records[i]["labels"]))
        for i in sorted(records):  # in the order the images were given
            print(json.dumps(records[i]), flush=True)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
