"""Name the items in pictures: python -m cnnrnn.predict CKPT_OR_ONNX PICTURE_OR_FOLDER ...

One JSON line per picture on stdout: {"image": path, "labels": [names], "scores": {name: probability}}, with the
class names of the data the model was trained on; a multiset model names a class once per item and adds "counts":
{name: n}, and `--top-k K` adds "top": [[name, score], ...]. Folders are walked, subfolders too. Every picture is
converted as the training items were (data.pictures): to the item size for a single-label model; for a multi-label
one kept as it is where its sides are multiples of the cell size (one item per cell, any grid up to 16x16), else
made the size of its training pictures. The model is a checkpoint, or an .onnx file written by cnnrnn.export (run
by onnxruntime on CPU; the same lines). A bad picture is reported on stderr in one line and skipped, the others
are still predicted, and the exit status is then 2.
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

from cnnrnn import inference
from cnnrnn.data import pictures
from cnnrnn.data.composite import MAX_GRID
from cnnrnn.errors import UserError, fail, refusals
from cnnrnn.ranks import pick_device

BATCH = 256         # pictures read at a time
BATCH_CELLS = 2048  # cells per forward pass: a bound on memory whatever the pictures' size


def say(kind: str, message: str) -> None:
    """One line on stderr ("error: ..." or "warning: ..."): with the JSON lines on stdout, predict's output, so
    written directly rather than through logging, whose handlers a caller may have pointed elsewhere."""
    print(f"{kind}: {message}", file=sys.stderr, flush=True)


def image_paths(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files named, and the picture files in folders named and below them (sorted); a problem per bad input."""
    paths, problems = [], []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            try:
                named = sorted(f for f in p.rglob("*") if f.suffix.lower() in pictures.EXTENSIONS)
                found = [f for f in named if f.is_file()]
            except OSError as exc:
                problems.append(f"{p} cannot be listed ({exc.strerror or type(exc).__name__}); give a folder you can "
                                f"read.")
                continue
            for f in sorted(set(named) - set(found)):  # a dangling or looping link, a pipe, a folder: never opened
                say("warning", f"{f} is skipped: not a regular file (a broken link, a pipe or a folder).")
            if not found:
                problems.append(f"{p} holds no picture files ({', '.join(sorted(pictures.EXTENSIONS))}); give a "
                                f"folder of pictures.")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif p.exists():  # a pipe or a device would block or never end: not a picture file
            problems.append(f"{p} is not a regular file; give a picture file or a folder of pictures.")
        else:
            problems.append(f"{p} does not exist; give a picture file or a folder of pictures.")
    return paths, problems


def read_image(path: Path, m: inference.Predictor) -> torch.Tensor:
    """(C, H, W) uint8 of a picture file, converted as the model's training items were."""
    f = m.fmt
    array = pictures.read(path, f.channels, lambda message: say("warning", message))
    h, w = array.shape[:2]
    cells = (h // f.size) * (w // f.size)
    if not (m.composite and h % f.size == 0 and w % f.size == 0 and 0 < cells <= MAX_GRID ** 2):
        array = pictures.pad(pictures.fit(array, m.side), m.side, f.background)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (H, W, C) -> (C, H, W)


def record(path: Path, labels: list[int], scores: torch.Tensor, m: inference.Predictor, top_k: int = 0) -> str:
    """The picture's JSON line; a sentence instead when a score is NaN or infinite (JSON has no such number)."""
    values = [float(s) for s in scores]
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"{path}: the model gave NaN or infinite scores for this picture, so it has no prediction; "
                        f"check the picture and the checkpoint.")
    line = {"image": str(path), "labels": [m.classes[i] for i in labels],
            "scores": {c: round(v, 6) for c, v in zip(m.classes, values)}}
    if m.multiset:
        line["counts"] = dict(Counter(line["labels"]))
    if top_k:
        line["top"] = sorted(([c, round(v, 6)] for c, v in zip(m.classes, values)), key=lambda t: -t[1])[:top_k]
    return json.dumps(line, allow_nan=False)


def run(args) -> int:
    """Predict every picture; the number of problems reported."""
    with refusals():
        m = inference.load(args.ckpt, args.device, args.max_items, args.threshold)
    paths, problems = image_paths(args.images)
    for problem in problems:
        say("error", problem)
    for start in range(0, len(paths), BATCH):
        chunk, images = [], []
        for path in paths[start:start + BATCH]:
            try:
                images.append(read_image(path, m))
                chunk.append(path)
            except UserError as exc:
                problems.append(str(exc))
                say("error", str(exc))
        lines = {}
        for shape in dict.fromkeys(img.shape for img in images):  # forward passes of one picture size each
            same = [i for i, img in enumerate(images) if img.shape == shape]
            step = max(1, BATCH_CELLS // max(1, (shape[1] // m.fmt.size) * (shape[2] // m.fmt.size)))
            for at in (same[k:k + step] for k in range(0, len(same), step)):
                labels, scores = m.infer(torch.stack([images[i] for i in at]))
                for i, idx, row in zip(at, labels, scores):
                    try:
                        lines[i] = record(chunk[i], idx, row, m, args.top_k)
                    except UserError as exc:
                        problems.append(str(exc))
                        say("error", str(exc))
        for i in sorted(lines):  # in the order the pictures were given
            print(lines[i], flush=True)
    return len(problems)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.predict", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint written by cnnrnn.train (single- or multi-label), or an .onnx "
                                     "file written by cnnrnn.export")
    parser.add_argument("images", nargs="+", help="picture files or folders of pictures")
    parser.add_argument("--max-items", type=int, help="decoder only: name at most K items per picture (default: "
                                                      "one per cell)")
    parser.add_argument("--threshold", type=float, help="BCE head only: name the classes scored at least T "
                                                        "(default: the one tuned on validation)")
    parser.add_argument("--top-k", type=int, default=0, help="also list the K best-scored classes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where a checkpoint runs")
    args = parser.parse_args(argv)
    with refusals():
        pick_device(args.device, "--device ")
        if args.top_k < 0 or args.threshold is not None and not 0 < args.threshold < 1:
            raise UserError("--top-k must be 0 or more, and --threshold in (0, 1).")
    try:
        problems = run(args)
    except BrokenPipeError:  # the reader of stdout has gone (predict ... | head): stop without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: the flush at exit is quiet
        raise SystemExit(1) from None
    except OSError as exc:  # stdout on a full disk, say
        fail(f"Cannot write the predictions to standard output ({exc.strerror or type(exc).__name__}); the lines "
             f"before this one are complete.")
    except KeyboardInterrupt:
        fail("Interrupted; the lines above are the pictures predicted so far.", 130)
    if problems:
        raise SystemExit(2)


if __name__ == "__main__":
    main()
