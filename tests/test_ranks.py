"""Processes of a run: device, rank seeds, agreed stop signals, core shares; torchrun (slow)."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import PYTHON, ROOT, cli_env, needs_real_data, scalars

from cnnrnn import checkpoint, ranks
from cnnrnn.config import preset
from cnnrnn.errors import UserError


def test_rank_seeds_keep_rank_zero_and_differ_per_rank():
    assert ranks.rank_seed(7, 0) == 7  # a one-process run draws exactly as before
    seeds = {ranks.rank_seed(7, r) for r in range(4)} | {ranks.rank_seed(8, r) for r in range(4)}
    assert len(seeds) == 8 and ranks.rank_seed(7, 1) == ranks.rank_seed(7, 1)
    assert ranks.rank_seed(7, 0, step=5) != 7   # a resume with no saved state for rank 0: a stream of its own
    masks = []
    for r in (0, 1):
        ranks.seed_everything(ranks.rank_seed(7, r))
        masks.append(F.dropout(torch.ones(1000), 0.5))
    assert not torch.equal(*masks)


def test_a_resumed_rank_gets_back_its_own_generators():
    states = []
    for r in (0, 1):
        ranks.seed_everything(ranks.rank_seed(3, r))
        states.append(checkpoint.rng_state())
    expected = torch.rand(3), random.random(), np.random.rand()  # rank 1's next draws
    saved = {"rng": states[0], "rng_ranks": states, "config": {"seed": 3}, "state": {"global_step": 10}}
    ranks.restore_rng(saved, 1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    ranks.restore_rng(saved, 2)  # a rank the checkpoint has no state for: its own fresh stream
    third = torch.rand(3)
    ranks.restore_rng(saved, 0)
    assert not torch.equal(third, torch.rand(3))
    assert ranks.gather_rng(1)[0].keys() == checkpoint.rng_state().keys()  # one process: no collective


def test_a_stop_signal_sets_the_flag_and_a_second_one_would_kill():
    previous = signal.getsignal(signal.SIGTERM)
    with ranks.StopSignals() as stop:
        assert stop.agreed(1, torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.agreed(1, torch.device("cpu")) == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the next one is not caught
    assert signal.getsignal(signal.SIGTERM) == previous
    with pytest.raises(ranks.Stopped) as stopped, ranks.StopSignals(at_once=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    assert stopped.value.signum == signal.SIGINT


def test_devices_are_picked_and_cuda_without_a_gpu_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ranks.pick_device("cpu") == ranks.pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserError) as refused:
        ranks.pick_device("cuda")
    assert str(refused.value) == "trainer.device=cuda, but no CUDA device is available here; use trainer.device=cpu."
    with pytest.raises(UserError, match="--device cuda, but no CUDA device is available here; use --device cpu."):
        ranks.pick_device("cuda", "--device ")


def test_one_process_without_torchrun_and_a_stage_that_ignores_it(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert ranks.init_distributed(torch.device("cpu")) == (0, 1) and ranks.process_rank() == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert ranks.init_distributed(torch.device("cpu"), enabled=False) == (0, 1)  # a cached stage: one process
    assert ranks.process_rank() == 1


def test_start_process_seeds_every_generator_and_sets_the_threads(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    try:
        proc = ranks.start_process(preset("cnn", trainer={"device": "cpu", "threads": 1, "amp": False}).trainer, 11)
        first = torch.rand(2), random.random(), np.random.rand()
        assert proc == ranks.Process(torch.device("cpu"), 0, 1, False, 11) and torch.get_num_threads() == 1
        ranks.start_process(preset("cnn", trainer={"device": "cpu"}).trainer, 11)
        assert torch.equal(torch.rand(2), first[0]) and random.random() == first[1] and np.random.rand() == first[2]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(ranks, "cores", lambda: 8)


def test_torchrun_ranks_share_the_cores(eight_cores, monkeypatch):
    assert ranks.share_of_cores(None) is None  # alone: torch's default, every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ranks.processes_sharing_cores() == 2 and ranks.share_of_cores(None) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than cores: still one thread each
    assert ranks.share_of_cores(None) == 1


def test_joblib_sweep_jobs_share_the_cores(eight_cores):
    assert ranks.share_of_cores(None, 2) == 4
    assert ranks.share_of_cores(None, -1) == 1 and ranks.processes_sharing_cores(-1) == 8  # one job per core
    assert ranks.share_of_cores(None, 1) is None and ranks.share_of_cores(None, None) is None


def test_an_explicit_trainer_threads_wins(eight_cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ranks.share_of_cores(3) is None  # start_process sets the 3
    assert ranks.share_of_cores(None) == 4


def _agree(rank: int, world: int, store: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        stop = ranks.StopSignals()
        stop.signum = signal.SIGTERM if rank == 1 else None  # only rank 1 was signalled
        out.put((rank, stop.agreed(world, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_stop_signal_on_one_rank_stops_every_rank(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, 2, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, "a rank did not finish the agreement"
    answers = dict(out.get(timeout=5) for _ in procs)
    assert answers == {0: signal.SIGTERM, 1: signal.SIGTERM}


# --- torchrun (real data) -----------------------------------------------------------------------------------------

TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cnnrnn.train"]
# Dropout off and fp32, so that two ranks of 64 compute the very loss and gradient of one process at 128, up to
# summation order. (The cnn's batch norm normalises over each rank's half batch: close, but not the same.)
ARGS = ["task=lstm", "model.dropout=0", "trainer.amp=false", "trainer.epochs=1", "data.limit=2000",
        "trainer.progress=false", "data.train_eval_size=500", "data.val_size=1000"]


@pytest.mark.slow
@needs_real_data
def test_two_processes_match_one(tmp_path):
    one, two, scratch = tmp_path / "one", tmp_path / "two", tmp_path / "tmp"
    scratch.mkdir()
    env = {**cli_env(), "TMPDIR": str(scratch)}
    single = subprocess.run([PYTHON, "-m", "cnnrnn.train", *ARGS, f"hydra.run.dir={one}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([*TORCHRUN, *ARGS, f"hydra.run.dir={two}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr
    assert "ranks=2" in (two / "train.log").read_text()
    assert len(list(two.rglob("metrics.json"))) == 1 and len(list(two.glob("events.out.tfevents*"))) == 2
    torch_own = ("torchelastic_", "torchinductor_")  # torchrun's and torch's own scratch folders
    assert [p.name for p in scratch.iterdir() if not p.name.startswith(torch_own)] == []  # no rank wrote there
    acc = [json.loads((run / "metrics.json").read_text())["test/acc"] for run in (one, two)]
    assert acc[1] > 0.3 and abs(acc[0] - acc[1]) <= 0.01, acc  # it learned, as much as one process did
    a, b = scalars(one, "train/loss"), scalars(two, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b]  # the same global steps
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) < 1e-4 * x, f"step {step}: loss {x} with one process, {y} with two"


# task=multilabel with dropout (the preset's 0.3) and flips (data.augment): ranks draw their own noise, so the runs
# agree only statistically: a seed's worth of difference at most (0.08 in loss seen), far below what training moves
# (loss 2.40 = ln 11 at the start).
MULTI = ["task=multilabel", "model.channels=[8,16]", "model.cell_dim=32", "model.hidden=32", "model.embed=16",
         "model.attn_dim=16", "data.augment=true", "data.hflip=0.5", "data.limit=2000", "data.val_size=300",
         "data.test_size=300", "data.train_eval_size=100", "trainer.batch_size=64", "trainer.epochs=2",
         "optim.lr=3e-3", "trainer.amp=false", "trainer.threads=1", "trainer.progress=false", "reader.epochs=1"]


@pytest.mark.slow
@needs_real_data
def test_two_processes_train_the_reader_once_then_the_decoder_like_one(tmp_path):
    one, two, readers = tmp_path / "one", tmp_path / "two", tmp_path / "readers"
    # rank 0 trains the reader stage alone while rank 1 waits for it, then both train the decoder
    ddp = subprocess.run([*TORCHRUN, *MULTI, f"reader.cache={readers}", "trainer.ckpt_every=10",
                          f"hydra.run.dir={two}"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "ranks=2" in (two / "train.log").read_text()
    rngs = checkpoint.load(two / "checkpoints" / "last.pt")["rng_ranks"]  # each rank's generators, for resuming
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])
    reader = [p.parent.parent for p in readers.glob("*/checkpoints/best.pt")]
    assert len(reader) == 1 and "ranks=2" not in (reader[0] / "train.log").read_text()
    single = subprocess.run([PYTHON, "-m", "cnnrnn.train", *MULTI, f"reader.cache={readers}",
                             f"hydra.run.dir={one}"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(list(readers.glob("*/checkpoints/best.pt"))) == 1  # the same recipe: the same reader, reused
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (one, two))
    assert m1["oracle/f1_samples"] == m2["oracle/f1_samples"]  # the same reader, scored on the same composites
    assert m1["test/loss"] < 2.3 and m2["test/loss"] < 2.3, (m1["test/loss"], m2["test/loss"])  # both learned
    assert abs(m1["test/loss"] - m2["test/loss"]) <= 0.1, (m1["test/loss"], m2["test/loss"])
    assert abs(m1["test/f1_samples"] - m2["test/f1_samples"]) <= 0.1, (m1["test/f1_samples"], m2["test/f1_samples"])
    assert m2["epochs"] == 2
    assert [s for s, _ in scalars(one, "train/loss")] == [s for s, _ in scalars(two, "train/loss")]


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


@pytest.mark.slow
@needs_real_data
def test_a_stop_signal_to_one_rank_stops_both_at_one_step_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = ["task=lstm", "model.hidden=32", "data.limit=1500", "data.val_size=200", "data.train_eval_size=100",
            "trainer.batch_size=32", "trainer.epochs=1", "trainer.progress=false", "trainer.threads=1",
            "trainer.ckpt_every=3", "trainer.log_every=1"]
    proc = subprocess.Popen([*TORCHRUN, *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "last.pt").is_file():  # both ranks are in the loop
            assert proc.poll() is None and time.time() < deadline, "the run never wrote its first checkpoint"
            time.sleep(0.05)
        os.kill(_worker(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 must stop too, not wait for it
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    # Only rank 0 logs, and it was never signalled: it stopped because the ranks agreed. (Exit codes prove less:
    # torchrun sends SIGTERM to rank 0 once rank 1 has exited, which can land while rank 0's interpreter exits.)
    stopped = re.search(r"Stopped by SIGTERM at epoch 1, step (\d+)", out)
    assert stopped, out[-3000:]
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert not (run_dir / "metrics.json").exists() and saved["state"]["global_step"] == int(stopped[1]) < 1500 // 32
    assert len(saved["rng_ranks"]) == 2
    resumed = subprocess.run([*TORCHRUN, f"resume={run_dir}"], cwd=ROOT, env=cli_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["state"]["global_step"] == 1500 // 32
