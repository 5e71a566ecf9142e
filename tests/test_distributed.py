"""Data-parallel training with torchrun: two CPU processes (gloo) behave like one with the same global batch."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch

from cnnrnn.engine import load_checkpoint
from conftest import PYTHON, ROOT, cli_env, needs_real_data
from test_train import scalar

# Dropout off and fp32, so that two ranks of 64 compute the very loss and gradient of one process at 128, up to
# summation order. (The cnn's batch norm normalises over each rank's half batch: close, but not the same.)
ARGS = ["task=lstm", "model.dropout=0", "trainer.amp=false", "trainer.epochs=1", "data.limit=2000",
        "trainer.progress=false", "data.train_eval_size=500", "data.val_size=1000"]


@needs_real_data
def test_two_processes_match_one(tmp_path):
    one, two, scratch = tmp_path / "one", tmp_path / "two", tmp_path / "tmp"
    scratch.mkdir()
    env = {**cli_env(), "TMPDIR": str(scratch)}
    single = subprocess.run([PYTHON, "-m", "cnnrnn.train", *ARGS, f"hydra.run.dir={one}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "cnnrnn.train", *ARGS, f"hydra.run.dir={two}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    assert "ranks=2" in (two / "train.log").read_text()
    assert len(list(two.rglob("metrics.json"))) == 1 and len(list(two.glob("events.out.tfevents*"))) == 2
    assert not list(scratch.glob("cnnrnn-rank*"))  # rank 1's throw-away run dir is gone with it
    acc = [json.loads((run / "metrics.json").read_text())["test/acc"] for run in (one, two)]
    assert acc[1] > 0.3 and abs(acc[0] - acc[1]) <= 0.01, acc  # it learned, as much as one process did
    a, b = scalar(one, "train/loss"), scalar(two, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]  # the same global steps
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-4 * x, f"step {step}: loss {x} with one process, {y} with two"


# task=multilabel with dropout (the preset's 0.3) and flips (data.augment): ranks draw their own noise, so the runs
# agree only statistically. Tolerance, from 1-process runs of exactly this setup with seeds 0-3: test/loss
# 1.578-1.595, test/f1_samples 0.453-0.522. Two ranks see the same global batches with other noise on half of
# each (and batch norm over half batches): a seed's worth of difference at most, so the bounds are ~3x the loss
# range and ~1.5x the f1 range, still far below what training moves (loss 2.40 = ln 11 at the start).
MULTI = ["task=multilabel", "model.channels=[8,16]", "model.cell_dim=32", "model.hidden=32", "model.embed=16",
         "model.attn_dim=16", "data.augment=true", "data.hflip=0.5", "data.limit=2000", "data.val_size=300",
         "data.test_size=300", "data.train_eval_size=100", "trainer.batch_size=64", "trainer.epochs=2",
         "optim.lr=3e-3", "trainer.amp=false", "trainer.threads=1", "trainer.progress=false"]


@needs_real_data
def test_two_processes_train_the_decoder_like_one_and_the_oracle_after_the_group(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = cli_env()
    # no oracle.ckpt: rank 0 trains the tile oracle after leaving the process group (it used to hang or fail)
    ddp = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "cnnrnn.train", *MULTI, "oracle.epochs=1", "oracle.cache=null", "trainer.ckpt_every=10",
                          f"hydra.run.dir={two}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "ranks=2" in (two / "train.log").read_text()
    rngs = load_checkpoint(two / "checkpoints" / "last.pt")["rng_ranks"]  # each rank's generators, for resuming
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    oracle = two / "oracle" / "checkpoints" / "best.pt"
    assert oracle.is_file()
    single = subprocess.run([PYTHON, "-m", "cnnrnn.train", *MULTI, f"oracle.ckpt={oracle}", f"hydra.run.dir={one}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert m1["oracle/f1_samples"] == m2["oracle/f1_samples"]  # the same cnn, scored on the same composites
    assert m1["test/loss"] < 2.0 and m2["test/loss"] < 2.0, (m1["test/loss"], m2["test/loss"])  # both learned
    assert abs(m1["test/loss"] - m2["test/loss"]) <= 0.05, (m1["test/loss"], m2["test/loss"])
    assert abs(m1["test/f1_samples"] - m2["test/f1_samples"]) <= 0.1, (m1["test/f1_samples"], m2["test/f1_samples"])
    assert m2["epochs"] == 2 and [s for s, _ in scalar(one, "train/loss")] == [s for s, _ in scalar(two, "train/loss")]


def _worker(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of this rank, if it has started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                    f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


@needs_real_data
def test_a_stop_signal_to_one_rank_stops_both_at_one_step_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["task=lstm", "model.hidden=32", "data.limit=1500", "data.val_size=200", "data.train_eval_size=100",
            "trainer.batch_size=32", "trainer.epochs=1", "trainer.progress=false", "trainer.threads=1",
            "trainer.ckpt_every=3"]
    torchrun = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cnnrnn.train"]
    proc = subprocess.Popen([*torchrun, *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "last.pt").is_file():  # both ranks are in the loop
            assert proc.poll() is None and time.time() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.05)
        os.kill(_worker(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 must stop too, not wait for it
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # Only rank 0 logs, and it was never signalled: it stopped because the ranks agreed. (Exit codes prove less:
    # torchrun sends SIGTERM to rank 0 once rank 1 has exited, which can land while rank 0's interpreter exits.)
    stopped = re.search(r"Stopped by SIGTERM at epoch 1, step (\d+)", out)
    assert stopped, out[-3000:]
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert not saved.get("finished") and saved["global_step"] == int(stopped[1]) < 1500 // 32
    assert len(saved["rng_ranks"]) == 2
    resumed = subprocess.run([*torchrun, f"resume={run_dir}"], cwd=ROOT, env=cli_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
