"""A first result in minutes: python -m cnnrnn.demo [FOLDER]

Trains a small decoder through the Python API (a reader on 20,000 items, then the decoder on its frozen
features), writes a few test composites as PNG files and names their items with the trained checkpoint, as
`python -m cnnrnn.predict` would. Everything goes to FOLDER (default runs/demo/TIME); `tensorboard --logdir runs`
shows its F1 curves and attention maps. About 3 minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from cnnrnn import inference, stages
from cnnrnn.config import preset
from cnnrnn.errors import UserError, fail
from cnnrnn.files import write_atomic
from cnnrnn.rundir import claim

log = logging.getLogger("cnnrnn")
SMALL = {"data": {"limit": 20000, "test_size": 2000}, "trainer": {"epochs": 10}, "reader": {"epochs": 8}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.demo", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=f"runs/demo/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        folder = claim(args.folder, "FOLDER").path
        cfg = preset("multilabel", **{**SMALL, "reader": {**SMALL["reader"], "cache": str(folder)}})
        results = stages.run(cfg, folder / "run")
        pictures = write_pictures(folder / "pictures", cfg, count=8)
        model = inference.load(str(folder / "run" / "checkpoints" / "best.pt"))
        labels, scores = model.infer(pictures["images"])
    except UserError as exc:
        fail(str(exc))
    for path, names, truth in zip(pictures["paths"], labels, pictures["truth"]):
        print(json.dumps({"image": str(path), "labels": [model.classes[i] for i in names], "true": truth}))
    log.info("test f1_samples %.4f, exact match %.4f on %d composites; see %s, or tensorboard --logdir runs",
             results["test/f1_samples"], results["test/exact_match"], cfg.data.test_size, folder)


def write_pictures(folder: Path, cfg, count: int) -> dict:
    """The first `count` test composites of the run as PNG files, with their true label names."""
    from cnnrnn.data import fashion_mnist
    from cnnrnn.tasks import make_task

    task = make_task(cfg)
    splits = fashion_mnist.splits(cfg.data.root, cfg.data.val_size, cfg.data.limit, cfg.data.seed)
    test = task.sources(cfg, splits).test
    batch = test.batch(test.order(None)[:count])
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"composite_{i}.png" for i in range(count)]
    for path, image in zip(paths, batch["image"]):
        write_atomic(path, lambda tmp, image=image: Image.fromarray(image.numpy()).save(tmp, format="PNG"))
    truth = [[fashion_mnist.CLASSES[c] for c in row.nonzero().flatten().tolist()] for row in batch["labels"]]
    return {"paths": paths, "images": batch["image"], "truth": truth}


if __name__ == "__main__":
    sys.exit(main())
