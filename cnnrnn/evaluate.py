"""Recompute a checkpoint's test metrics: python -m cnnrnn.evaluate CKPT.

Everything comes from the checkpoint (config, class names, tuned threshold); the table goes to stderr and
one JSON object, with the keys of the run's metrics.json, to stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from cnnrnn import build, report
from cnnrnn.cli import fail
from cnnrnn.data import fashion_mnist
from cnnrnn.engine import load_checkpoint
from cnnrnn.errors import UserError

log = logging.getLogger("cnnrnn")


def evaluate_checkpoint(path: str | Path, data_root: str | None = None, device: str = "cpu",
                        oracle: str | None = None) -> dict:
    """The run's metrics.json as this checkpoint gives it: test/* (and oracle/*) recomputed, the rest carried."""
    state = load_checkpoint(path)
    cfg, model, task = build.from_checkpoint(state, path, device)
    data = fashion_mnist.splits(data_root or cfg.data.root, cfg.data.val_size, cfg.data.limit, cfg.data.seed)
    src = build.sources(cfg, data, state.get("scene"))
    dev = torch.device(device)
    results, _, _ = report.score_test(model, task, src.test, dev, amp=cfg.trainer.amp or dev.type == "cuda")
    summary = dict(state.get("summary", {}))
    oracle_path = oracle or summary.get("oracle/ckpt")
    if cfg.kind != "single" and oracle_path and (oracle or Path(oracle_path).is_file()):
        summary.update(report.score_oracle(oracle_path, cfg.data.grid, src.test, dev))
    return {**results, **summary}


def table(results: dict) -> str:
    rows = [(k, v) for k, v in results.items() if isinstance(v, (int, float))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a checkpoint (RUN_DIR/checkpoints/best.pt) or a run dir")
    parser.add_argument("--data-root", help="where Fashion-MNIST is, if not where the run found it")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--oracle", help="multi-label only: a task=cnn checkpoint for the tile oracle "
                                         "(default: the one the run used)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        results = evaluate_checkpoint(args.ckpt, args.data_root, args.device, args.oracle)
    except UserError as exc:
        fail(str(exc))
    print(table(results), file=sys.stderr)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
