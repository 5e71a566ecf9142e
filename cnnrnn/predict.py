"""Name the items in images: python -m cnnrnn.predict CKPT_OR_ONNX IMAGE_OR_DIR ...

One JSON line per image on stdout: {"image": path, "labels": [names], "scores": {name: probability}}.
The model is a checkpoint, or an .onnx file written by cnnrnn.export (run by onnxruntime on CPU; the same
lines). Images are 8-bit gray, light items on black (RGB is converted), 28 pixels square for a single-label
model and grid x 28 for a multi-label one (--resize scales others). A bad image is reported on stderr and
skipped; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import sys
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


def read_image(path: Path, side: int, resize: bool) -> torch.Tensor:
    """(side, side) uint8, gray, light on black."""
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (side, side):
                if not resize:
                    raise UserError(f"{path} is {img.size[0]}x{img.size[1]} pixels, but this model reads "
                                f"{side}x{side}; pass --resize to scale it.")
                img = img.resize((side, side), Image.BILINEAR)
            return torch.from_numpy(np.array(img, dtype=np.uint8))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}); give a PNG or JPEG file.") from None


def predict(model, task, images: torch.Tensor) -> tuple[list[list[int]], torch.Tensor]:
    """Label indices (in emission order for the decoder) and per-class scores for uint8 images (B, H, W)."""
    out = task.predict(model, {"image": images})
    return task.labels(out), out["scores"]


def load(path: str) -> tuple[Callable, int, list[str]]:
    """predict()'s function of uint8 images (B, H, W), the image side and the class names, for a checkpoint
    or an exported .onnx file."""
    if path.lower().endswith(".onnx"):
        from cnnrnn.exported import OnnxModel

        onnx_model = OnnxModel(path)
        return onnx_model.predict, onnx_model.side, onnx_model.classes
    state = load_checkpoint(path)
    cfg, model, task = build.from_checkpoint(state, path)
    side = SIDE if cfg.kind == "single" else SIDE * cfg.data.grid
    return partial(predict, model, task), side, list(CLASSES)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint written by cnnrnn.train (single- or multi-label), or an .onnx "
                                     "file written by cnnrnn.export")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--resize", action="store_true", help="scale images of another size to the model's")
    args = parser.parse_args(argv)
    try:
        infer, side, classes = load(args.ckpt)
    except UserError as exc:
        fail(str(exc))
    paths, problems = image_paths(args.images)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    for start in range(0, len(paths), BATCH):
        chunk, images = [], []
        for path in paths[start:start + BATCH]:
            try:
                images.append(read_image(path, side, args.resize))
                chunk.append(path)
            except UserError as exc:
                problems.append(str(exc))
                print(f"error: {exc}", file=sys.stderr)
        if not images:
            continue
        labels, scores = infer(torch.stack(images))
        for path, idx, row in zip(chunk, labels, scores):
            record = {"image": str(path), "labels": [classes[i] for i in idx],
                      "scores": {c: round(float(s), 6) for c, s in zip(classes, row)}}
            print(json.dumps(record), flush=True)
    if problems:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
