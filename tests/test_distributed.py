"""Data-parallel training with torchrun: two CPU processes (gloo) behave like one with the same global batch."""
from __future__ import annotations

import json
import subprocess

from conftest import PYTHON, ROOT, cli_env, needs_real_data
from test_train import scalar

# Dropout off and fp32, so that two ranks of 64 compute the very loss and gradient of one process at 128, up to
# summation order. (The cnn's batch norm normalises over each rank's half batch: close, but not the same.)
ARGS = ["task=lstm", "model.dropout=0", "trainer.amp=false", "trainer.epochs=1", "data.limit=2000",
        "trainer.progress=false", "data.train_eval_size=500", "data.val_size=1000"]


@needs_real_data
def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = cli_env()
    single = subprocess.run([PYTHON, "-m", "cnnrnn.train", *ARGS, f"hydra.run.dir={one}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "cnnrnn.train", *ARGS, f"hydra.run.dir={two}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    assert "ranks=2" in (two / "train.log").read_text()
    assert len(list(two.rglob("metrics.json"))) == 1 and len(list(two.glob("events.out.tfevents*"))) == 2
    acc = [json.loads((run / "metrics.json").read_text())["test/acc"] for run in (one, two)]
    assert acc[1] > 0.3 and abs(acc[0] - acc[1]) <= 0.01, acc  # it learned, as much as one process did
    a, b = scalar(one, "train/loss"), scalar(two, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]  # the same global steps
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-4 * x, f"step {step}: loss {x} with one process, {y} with two"
