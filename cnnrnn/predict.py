"""Name the items in images: python -m cnnrnn.predict CKPT_OR_ONNX IMAGE_OR_DIR ...

One JSON line per image on stdout: {"image": path, "labels": [names], "scores": {name: probability}}; a
multiset model (model.target=multiset) names a class once per item and adds "counts": {name: n}.
The model is a checkpoint, or an .onnx file written by cnnrnn.export (run by onnxruntime on CPU; the same
lines). Images are gray, light items on black (RGB is converted), 28 pixels square for a single-label model;
a multi-label checkpoint reads any picture whose sides are multiples of 28 (one item per 28x28 cell, square or
not; the decoder names at most one label per cell, or --max-items), an .onnx file its exported size. --resize
scales other sizes to the size the model was trained on. Pixels are scaled by their real range: 8-bit as
they are; 16-bit by 65535; 32-bit integers by 255 if they fit in it, else by 65535 if they fit in that; float
images within [0, 1] by 1, within [0, 255] as 8-bit levels; other ranges are stretched from their minimum to
their maximum, with a warning. A bad image is reported on stderr in one line and skipped, the others are still
predicted, and the exit status is then 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as TF

from cnnrnn import inference
from cnnrnn.data import pictures
from cnnrnn.data.composite import MAX_GRID
from cnnrnn.data.fashion_mnist import SIDE
from cnnrnn.errors import UserError, fail
from cnnrnn.ranks import pick_device


def say(kind: str, message: str) -> None:
    """One line on stderr ("error: ..." or "warning: ..."): with the JSON lines on stdout, predict's output, so
    written directly rather than through logging, whose handlers a caller may have pointed elsewhere."""
    print(f"{kind}: {message}", file=sys.stderr, flush=True)

EXTENSIONS = pictures.EXTENSIONS
BATCH = 256         # images read at a time
BATCH_CELLS = 2048  # 28x28 cells per forward pass: a bound on memory whatever the pictures' size


def image_paths(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named, and image files inside folders named (sorted); a problem per bad input."""
    paths, problems = [], []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            try:
                named = sorted(f for f in p.iterdir() if f.suffix.lower() in EXTENSIONS)
                found = [f for f in named if f.is_file()]
            except OSError as exc:
                problems.append(f"{p} cannot be listed ({exc.strerror or type(exc).__name__}); give a folder you can "
                                f"read.")
                continue
            for f in named:
                if f not in found:  # a dangling or looping link, a pipe, a folder: never opened, said once
                    say("warning", f"{f} is skipped: not a regular file (a broken link, a pipe or a folder).")
            if not found:
                problems.append(f"{p} holds no image files ({', '.join(sorted(EXTENSIONS))}); give a folder of images.")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif p.exists():  # a pipe or a device would block or never end: not an image file
            problems.append(f"{p} is not a regular file; give an image file or a folder of images.")
        else:
            problems.append(f"{p} does not exist; give an image file or a folder of images.")
    return paths, problems


def read_image(path: Path, side: int, resize: bool, any_grid: bool = False) -> torch.Tensor:
    """(H, W) uint8, gray, light on black: side x side, or with `any_grid` any multiple of 28 a side."""
    img = pictures.read_gray(path, lambda message: say("warning", message))
    h, w = img.shape
    if not ((w, h) == (side, side) or any_grid and w % SIDE == 0 and h % SIDE == 0 and w and h):
        if not resize:
            reads = (f"pictures whose sides are multiples of {SIDE} pixels (one item per {SIDE}x{SIDE} cell)"
                     if any_grid else f"{side}x{side}")
            raise UserError(f"{path} is {w}x{h} pixels, but this model reads {reads}; pass --resize to scale it "
                            f"to {side}x{side}.")
        img = TF.resize(img[None], [side, side])[0]
    elif (w // SIDE) * (h // SIDE) > MAX_GRID ** 2:  # one bound where pictures enter: memory, not pixels
        raise UserError(f"{path} is {w}x{h} pixels, {(w // SIDE) * (h // SIDE):,} cells of {SIDE}x{SIDE}, more than "
                        f"the {MAX_GRID ** 2} ({MAX_GRID}x{MAX_GRID}) a model reads; crop it, or pass --resize to "
                        f"scale it to {side}x{side}.")
    return img


def record(path: Path, labels: list[int], scores: torch.Tensor, classes: list[str], counts: bool = False) -> str:
    """The image's JSON line (with `counts`, each class's number of items); a sentence instead when a score is
    NaN or infinite (JSON has no such number)."""
    values = [float(s) for s in scores]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{path}: the model gave NaN or infinite scores for this image, so it has no prediction; "
                        f"check the image and the checkpoint.")
    line = {"image": str(path), "labels": [classes[i] for i in labels],
            "scores": {c: round(v, 6) for c, v in zip(classes, values)}}
    if counts:
        line["counts"] = dict(Counter(line["labels"]))
    return json.dumps(line, allow_nan=False)


def quiet_broken_pipe() -> None:
    """The reader of stdout has gone (predict ... | head): stop without a traceback. Python's documented recipe:
    point stdout at devnull, so that the flush at exit does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(1)


def run(args) -> int:
    """Predict every image; the number of problems reported."""
    try:
        m = inference.load(args.ckpt, args.device, args.max_items)
    except UserError as exc:
        fail(str(exc))
    paths, problems = image_paths(args.images)
    for problem in problems:
        say("error", problem)
    for start in range(0, len(paths), BATCH):
        chunk, images = [], []
        for path in paths[start:start + BATCH]:
            try:
                images.append(read_image(path, m.side, args.resize, m.any_grid))
                chunk.append(path)
            except UserError as exc:
                problems.append(str(exc))
                say("error", str(exc))
        lines = {}
        for shape in dict.fromkeys(img.shape for img in images):  # forward passes of one picture size each
            same = [i for i, img in enumerate(images) if img.shape == shape]
            step = max(1, BATCH_CELLS // max(1, (shape[0] // SIDE) * (shape[1] // SIDE)))
            for at in (same[k:k + step] for k in range(0, len(same), step)):
                labels, scores = m.infer(torch.stack([images[i] for i in at]))
                for i, idx, row in zip(at, labels, scores):
                    try:
                        lines[i] = record(chunk[i], idx, row, m.classes, m.multiset)
                    except UserError as exc:
                        problems.append(str(exc))
                        say("error", str(exc))
        for i in sorted(lines):  # in the order the images were given
            print(lines[i], flush=True)
    return len(problems)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint written by cnnrnn.train (single- or multi-label), or an .onnx "
                                     "file written by cnnrnn.export")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--resize", action="store_true", help="scale images of a size the model does not read to "
                                                              "the size it was trained on")
    parser.add_argument("--max-items", type=int, help="decoder only: name at most K items per picture (default: "
                                                      "one per 28x28 cell)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where a checkpoint runs")
    args = parser.parse_args(argv)
    try:
        pick_device(args.device, "--device ")
    except UserError as exc:
        fail(str(exc))
    try:
        problems = run(args)
    except BrokenPipeError:
        quiet_broken_pipe()
    except OSError as exc:  # stdout on a full disk, say
        fail(f"Cannot write the predictions to standard output ({exc.strerror or type(exc).__name__}); the lines "
             f"before this one are complete.")
    except KeyboardInterrupt:
        fail("Interrupted; the lines above are the images predicted so far.", 130)
    if problems:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
