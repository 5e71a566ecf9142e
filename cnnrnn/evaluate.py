"""Recompute a checkpoint's test metrics: python -m cnnrnn.evaluate CKPT [--data PATH] [--grid N] [--max-items K].

Everything comes from the checkpoint (config, tuned threshold, training class counts); the table goes to stderr
and one JSON object, with the keys of the run's metrics.json, to stdout. On the device the run used (by default)
every number equals the run's. --data scores the test items of another labelled folder or CSV instead; --grid N
makes the test composites N x N grids of the same test items (no resizing), --max-items K makes them hold 1..K
items and the decoder name at most K.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from cnnrnn import build, checkpoint
from cnnrnn.data import folder, sources
from cnnrnn.data.composite import MAX_GRID
from cnnrnn.engine import resolve_amp, score
from cnnrnn.errors import UserError, fail, refusals
from cnnrnn.files import strict_json
from cnnrnn.ranks import pick_device
from cnnrnn.report import markdown
from cnnrnn.training import score_oracle

log = logging.getLogger("cnnrnn")


def run_device(name: str | None, cfg) -> torch.device:
    """--device, else the run's own trainer.device (the numbers are exact only on the kind of device it used)."""
    if name is None and cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        log.warning("warning: the run used cuda, which is not available here; evaluating on cpu, so the last "
                    "digits can differ from its metrics.json")
        return torch.device("cpu")
    return pick_device(name or cfg.trainer.device, "--device ")


def on_grid(cfg, task, grid: int | None, max_items: int | None):
    """The config whose test composites are grid x grid with 1..max_items items; the decoder told max_items."""
    if grid is None and max_items is None:
        return cfg
    if not task.composite:
        raise UserError(f"--grid and --max-items are for composites, but this checkpoint holds a single-label "
                        f"task={cfg.task} model that reads one item; drop them.")
    d = cfg.data
    grid = grid or d.test_grid
    if max_items is None:  # the run's own test distribution on its grid, every cell count on another
        max_items = d.max_items if grid == d.test_grid else grid ** 2
    if not 1 <= max_items <= grid ** 2:
        raise UserError(f"--max-items {max_items} must be between 1 and the {grid ** 2} cells of a {grid}x{grid} "
                        f"grid.")
    if task.takes_max_items:
        task.max_items = max_items
    data = dataclasses.replace(d, grid=grid, eval_grid=grid, max_items=max_items,
                               min_items=min(d.min_items, max_items))
    return dataclasses.replace(cfg, data=data)


def evaluate_checkpoint(path: str | Path, data: str | None = None, device: str | None = None,
                        grid: int | None = None, max_items: int | None = None) -> dict:
    """The run's metrics.json as this checkpoint gives it: test/* (and oracle/*) recomputed, the rest carried;
    with `data`, on the test items of that folder or CSV; with `grid` / `max_items`, on test composites of that
    grid / with at most that many items instead."""
    if str(path).lower().endswith(".onnx"):
        raise UserError(f"{path} is an exported ONNX model, but evaluate reads checkpoints; give the run's "
                        f"checkpoints/best.pt (predict reads .onnx files).")
    if data is not None and not Path(data).exists():
        raise UserError(f"--data {data} does not exist; give a folder of class folders or a CSV of your pictures.")
    state = checkpoint.load(path)
    cfg, model, task = build.from_checkpoint(state, path)
    cfg = on_grid(cfg, task, grid, max_items)
    dev = run_device(device, cfg)
    summary = dict(checkpoint.entry(state, "summary", dict, path, default={}))
    oracle = summary.get("oracle/ckpt")
    reader = (build.reader_model(oracle, dev, "the run's reader") if task.composite and oracle and data is None
              and Path(oracle).is_file() else None)
    model = model.to(dev)
    splits = sources.load(cfg.data)[0] if data is None else {
        "train": (test := folder.load_test(Path(data), task.fmt, cfg.data.label_sep)), "val": test, "test": test}
    src = task.sources(cfg, splits, state.get("scene"), device=dev)
    metrics, _, _ = score(model, task, src.test, dev, amp=resolve_amp(cfg.trainer.amp, dev))
    if grid is not None or max_items is not None or data is not None:  # the run's oracle scored other pictures
        summary = {k: v for k, v in summary.items() if not k.startswith("oracle/")}
        summary.update({"test/grid": cfg.data.test_grid, "test/max_items": cfg.data.max_items} if data is None else
                       {"test/data": str(data), "test/items": len(splits["test"])})
    if reader is not None:
        summary.update(score_oracle(reader, src.test, dev, task.fmt), **{"oracle/ckpt": oracle})
    return {**{f"test/{k}": v for k, v in metrics.items()}, **summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint (RUN_DIR/checkpoints/best.pt) or a run dir")
    parser.add_argument("--data", help="score the test items of another labelled folder or CSV (same classes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="where to evaluate (default: the device the run trained on, cpu where it is absent)")
    parser.add_argument("--grid", type=int, help="test composites of N x N cells (default: the run's grid)")
    parser.add_argument("--max-items", type=int, help="test composites of 1..K items, the decoder naming at most K "
                                                      "(default: the run's data.max_items on its grid, else all "
                                                      "cells)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        with refusals():
            if args.device is not None:
                pick_device(args.device, "--device ")  # before the checkpoint is read
            if args.grid is not None and not 1 <= args.grid <= MAX_GRID:
                raise UserError(f"--grid {args.grid} must be from 1 to {MAX_GRID} (cells per side).")
            results = evaluate_checkpoint(args.ckpt, args.data, args.device, args.grid, args.max_items)
    except KeyboardInterrupt:
        fail("Interrupted before the metrics were complete; nothing was printed.", 130)
    rows = [[k, f"{v:.4f}" if isinstance(v, float) else str(v)] for k, v in results.items()
            if isinstance(v, (int, float))]
    print(markdown(["metric", "value"], rows, "lr"), file=sys.stderr)
    print(strict_json(results))


if __name__ == "__main__":
    main()
