"""End-to-end training: the run directory, TensorBoard tags, metrics.json, reproducibility."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea

from cnnrnn.cli import compose_config
from cnnrnn.train import run
from conftest import PYTHON, ROOT, cli_env, needs_real_data, tiny


def tags(run_dir) -> dict[str, list]:
    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc.Tags()


def scalar(run_dir, tag) -> list[tuple[int, float]]:
    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("task", ["lstm", "cnn"])
def test_run_writes_the_whole_run_directory(fake_root, tmp_path, task):
    out = tmp_path / "run"
    metrics = run(compose_config(["task=" + task, *tiny(fake_root)]), out)
    for name in ("metrics.json", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("test/acc", "test/loss", "val/acc_best", "params", "train/ms_per_step", "wall_time_s",
                "test/acc/T-shirt-top", "test/acc/Ankle_boot"):
        assert key in saved, key
    assert 0.0 <= saved["test/acc"] <= 1.0 and saved["params"] > 0
    found = tags(out)
    for tag in ("train/loss", "train/acc", "val/acc", "val/loss", "lr", "perf/ms_per_step", "perf/samples_per_s",
                "test/acc", "test/loss"):
        assert tag in found["scalars"], tag
    assert {"test/confusion_matrix", "test/misclassified"} <= set(found["images"])
    steps = [s for s, _ in scalar(out, "train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 2 * (500 // 50)  # one point per step


def test_fake_data_is_learnt(fake_root, tmp_path):
    """The loop really trains: the bar position is trivially learnable by the CNN."""
    metrics = run(compose_config(["task=cnn", *tiny(fake_root, "trainer.epochs=3")]), tmp_path / "run")
    assert metrics["test/acc"] > 0.9


def test_same_seed_same_metrics(fake_root, tmp_path):
    cfg = ["task=lstm", *tiny(fake_root, "data.augment=true")]
    a = run(compose_config(cfg), tmp_path / "a")
    b = run(compose_config(cfg), tmp_path / "b")
    keys = [k for k in a if k.startswith(("test/", "val/"))]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    c = run(compose_config(cfg + ["seed=1"]), tmp_path / "c")
    assert a["test/loss"] != c["test/loss"]


@needs_real_data
@pytest.mark.parametrize("task", ["lstm", "cnn"])
def test_command_line_on_real_data(tmp_path, task):
    """The issue's check: one epoch on 3000 items leaves metrics.json, last.pt and the tags."""
    out = tmp_path / task
    cmd = [PYTHON, "-m", "cnnrnn.train", f"task={task}", "trainer.epochs=1", "data.limit=3000",
           "trainer.progress=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert (out / "train.log").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert {"train/loss", "val/acc", "val/loss", "test/acc"} <= set(tags(out)["scalars"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.3 and metrics["params"] == {"lstm": 162_574, "cnn": 421_738}[task]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["config"]["task"] == task
