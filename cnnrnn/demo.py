"""A first result in minutes: python -m cnnrnn.demo [FOLDER]

Trains a small decoder through the Python API (a reader on 20,000 items, then the decoder on its frozen
features), writes a few test composites as PNG files and names their items with the trained checkpoint, as
`python -m cnnrnn.predict` would. Everything goes to FOLDER (default runs/demo/TIME); `tensorboard --logdir runs`
shows its F1 curves and attention maps. About 3 minutes on two CPU cores; a stopped demo goes on where it stopped
when given the same FOLDER again.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from PIL import Image

from cnnrnn import checkpoint, inference, stages
from cnnrnn.config import preset
from cnnrnn.data import sources
from cnnrnn.errors import fail, refusals
from cnnrnn.files import write_atomic
from cnnrnn.rundir import Claim, claim, lock_existing
from cnnrnn.tasks import make_task

log = logging.getLogger("cnnrnn")
DEMO = ".demo"  # marks a demo's folder, which the same command continues after a stop
SMALL = {"data": {"limit": 20000, "test_size": 2000}, "trainer": {"epochs": 10}, "reader": {"epochs": 8}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.demo", description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=f"runs/demo/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    try:
        with refusals():
            held = open_folder(Path(args.folder))  # locked while the demo runs
            folder = held.path
            cfg = preset("multilabel", **{**SMALL, "reader": {**SMALL["reader"], "cache": str(folder)}})
            run, last = folder / "run", folder / "run" / "checkpoints" / "last.pt"
            results = (json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else
                       stages.run(cfg, run, checkpoint.load(last) if last.is_file() else None))
            pictures = write_pictures(folder / "pictures", cfg, count=8)
            model = inference.load(str(run / "checkpoints" / "best.pt"))
            labels, _ = model.infer(pictures["images"])
    except (KeyboardInterrupt, SystemExit) as exc:
        code = getattr(exc, "code", 130)
        if code in (0, 2):
            raise
        fail(f"Stopped; what it trained is kept: continue with python -m cnnrnn.demo {args.folder}", code)
    for path, names, truth in zip(pictures["paths"], labels, pictures["truth"]):
        print(json.dumps({"image": str(path), "labels": [model.classes[i] for i in names], "true": truth}))
    log.info("test f1_samples %.4f, exact match %.4f on %d composites; see %s, or tensorboard --logdir runs",
             results["test/f1_samples"], results["test/exact_match"], cfg.data.test_size, folder)


def open_folder(folder: Path) -> Claim:
    """The demo's folder, locked: a new or empty one, or one where a demo stopped (its DEMO mark), continued."""
    if (folder / DEMO).is_file():
        return lock_existing(folder, "FOLDER")
    held = claim(folder, "FOLDER")
    (held.path / DEMO).write_text("a demo's folder: python -m cnnrnn.demo FOLDER continues it\n")
    return held


def write_pictures(folder: Path, cfg, count: int) -> dict:
    """The first `count` test composites of the run as PNG files, with their true label names."""
    splits, fmt = sources.load(cfg.data)
    test = make_task(cfg, fmt).sources(cfg, splits).test
    batch = test.batch(test.order(None)[:count])
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"composite_{i}.png" for i in range(count)]
    for path, image in zip(paths, batch["image"]):
        write_atomic(path, lambda tmp, image=image: Image.fromarray(image[0].numpy()).save(tmp, format="PNG"))
    truth = [[fmt.classes[c] for c in row.nonzero().flatten().tolist()] for row in batch["labels"]]
    return {"paths": paths, "images": batch["image"], "truth": truth}


if __name__ == "__main__":
    sys.exit(main())
