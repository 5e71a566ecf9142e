"""End-to-end multi-label runs: the decoder, the BCE baseline and the tile oracle on one set of composites."""
from __future__ import annotations

import json

import pytest
import torch

from cnnrnn import build, report
from cnnrnn.cli import compose_config
from cnnrnn.data import fashion_mnist
from cnnrnn.engine import load_checkpoint, resolve_amp
from cnnrnn.metrics import best_threshold
from cnnrnn.train import run
from conftest import tiny
from test_train import tags

F1_TAGS = {"val/f1_micro", "val/f1_macro", "val/f1_samples", "val/exact_match", "val/hamming_loss",
           "test/f1_micro", "test/f1_samples", "test/exact_match"}


@pytest.mark.parametrize("task", ["multilabel", "multilabel_bce"])
def test_multilabel_run(fake_root, tmp_path, task):
    out = tmp_path / task
    extra = ["data.test_size=200", "model.channels=[4,8]"]
    metrics = run(compose_config([f"task={task}", *tiny(fake_root, *extra)]), out)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test/f1_micro", "test/f1_macro", "test/f1_samples", "test/exact_match", "test/hamming_loss",
                "test/cf1", "test/map", "test/cardinality_acc", "test/f1/Bag", "params", "oracle/f1_samples"):
        assert key in saved, key
    assert saved["test/f1_samples"] == pytest.approx(metrics["test/f1_samples"])
    found = tags(out)
    assert F1_TAGS <= set(found["scalars"])
    assert {"test/composites", "test/f1_per_class"} <= set(found["images"])
    if task == "multilabel":
        assert "test/attention" in found["images"]
    else:
        assert "test/f1_micro_at_0.5" in saved
        # the threshold is the micro-F1 optimum of the saved model on validation (not merely some grid value)
        state = load_checkpoint(out / "checkpoints" / "best.pt")
        cfg, model, bce = build.from_checkpoint(state, "best.pt")
        data = fashion_mnist.splits(cfg.data.root, cfg.data.val_size, cfg.data.limit, cfg.data.seed)
        cpu = torch.device("cpu")
        amp = resolve_amp(cfg.trainer.amp, cpu)
        _, val_out, val_t = report.score(model, bce, build.sources(cfg, data).val, cpu, amp)
        assert saved["threshold"] == best_threshold(val_t.numpy(), val_out["scores"].numpy())
    assert (out / "oracle" / "checkpoints" / "best.pt").is_file()
