"""The promises of a trustworthy run: clear errors on bad input, atomic checkpoints, safe loading,
exact resume after SIGKILL, and a clean stop on SIGINT/SIGTERM."""
from __future__ import annotations

import gzip
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnrnn import engine
from cnnrnn.cli import compose_config
from cnnrnn.engine import load_checkpoint, save_checkpoint
from cnnrnn.errors import UserError
from cnnrnn.train import run
from conftest import PYTHON, ROOT, cli_env, idx_bytes, needs_real_data, run_commands, tiny, write_dataset
from test_train import scalar


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", *map(str, args)], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Files for the bad-input walk: broken datasets, broken checkpoints, a finished run, images."""
    base = tmp_path_factory.mktemp("bad")
    for name in ("truncated", "magic", "counts", "labels"):
        write_dataset(base / name)  # tiny files: right format, wrong counts for the real loader
    with gzip.open(base / "truncated" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((60000, 28, 28), np.uint8))[:5000])
    with gzip.open(base / "magic" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((60000, 28, 28), np.uint8), magic=2049))
    for name, array in (("train-images-idx3-ubyte", np.zeros((60000, 28, 28))), ("t10k-images-idx3-ubyte",
                        np.zeros((10000, 28, 28))), ("train-labels-idx1-ubyte", np.full(60000, 12))):
        with gzip.open(base / "labels" / f"{name}.gz", "wb", compresslevel=1) as f:
            f.write(idx_bytes(array.astype(np.uint8)))
    (base / "ckpt").mkdir()
    (base / "ckpt" / "empty.pt").write_bytes(b"")
    (base / "ckpt" / "text.pt").write_text("not a checkpoint")
    full = base / "ckpt" / "full.pt"
    cfg = compose_config(["task=cnn"])
    from cnnrnn import build
    save_checkpoint(full, {"model": build.model(cfg).state_dict(), "config": cfg.to_dict()})
    (base / "ckpt" / "truncated.pt").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    alien = compose_config(["task=lstm"]).to_dict()  # an lstm config carrying cnn weights
    save_checkpoint(base / "ckpt" / "alien.pt", {"model": build.model(cfg).state_dict(), "config": alien})
    torch.save({"weights": torch.zeros(3)}, base / "ckpt" / "plain.pt")
    (base / "run" / "checkpoints").mkdir(parents=True)
    (base / "run" / "metrics.json").write_text("{}")
    (base / "images").mkdir()
    (base / "images" / "notes.png").write_text("hello")
    (base / "empty").mkdir()
    return base


BAD = [  # (command, the words the one sentence must hold)
    (["cnnrnn.train", "task=foo"], "Unknown task 'foo'"),
    (["cnnrnn.train", "trainer.epoch=3"], "did you mean 'trainer.epochs'"),
    (["cnnrnn.train", "trainer.epochs=abc"], "trainer.epochs='abc' must be of type int"),
    (["cnnrnn.train", "trainer.epochs=-1"], "trainer.epochs=-1 must be at least 1"),
    (["cnnrnn.train", "trainer.batch_size=0"], "trainer.batch_size=0 must be at least 1"),
    (["cnnrnn.train", "optim.lr=0"], "optim.lr=0.0 must be greater than 0"),
    (["cnnrnn.train", "optim.lr=-0.1"], "must be greater than 0"),
    (["cnnrnn.train", "data.min_items=3", "data.max_items=2"], "data.min_items=3 is larger than data.max_items=2"),
    (["cnnrnn.train", "data.max_items=5"], "more items than the 2x2 grid has cells"),
    (["cnnrnn.train", "data.val_size=60000"], "data.val_size=60000 must be between"),
    (["cnnrnn.train", "task=multilabel", "model.beam_size=0"], "model.beam_size=0 must be an integer of at least 1"),
    (["cnnrnn.train", "task=multilabel", "model.label_order=alphabetical"], "model.label_order='alphabetical'"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/truncated",
      "hydra.run.dir={bad}/runs/truncated"], "train-images-idx3-ubyte.gz is truncated"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/magic",
      "hydra.run.dir={bad}/runs/magic"], "magic number 2049, expected 2051"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/counts",
      "hydra.run.dir={bad}/runs/counts"], "holds 600 items, expected 60000"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/labels",
      "hydra.run.dir={bad}/runs/labels"], "label 12, outside 0..9"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/run"], "already holds a run"),
    (["cnnrnn.train", "resume={bad}/empty"], "has no checkpoints/last.pt"),
    (["cnnrnn.evaluate", "{bad}/ckpt/missing.pt"], "does not exist"),
    (["cnnrnn.evaluate", "{bad}/ckpt/empty.pt"], "is empty"),
    (["cnnrnn.evaluate", "{bad}/ckpt/truncated.pt"], "not a readable checkpoint"),
    (["cnnrnn.evaluate", "{bad}/ckpt/text.pt"], "not a readable checkpoint"),
    (["cnnrnn.evaluate", "{bad}/ckpt/plain.pt"], "not a cnnrnn checkpoint"),
    (["cnnrnn.predict", "{bad}/ckpt/alien.pt", "{bad}/images"], "do not fit a lstm model"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "{bad}/images/notes.png"], "is not a readable image"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "{bad}/empty"], "holds no image files"),
    # run dirs and early checks (issue 11)
    (["cnnrnn.train", "task=cnn", "data.root={bad}/run", "hydra.run.dir=${{data.root}}"], "already holds a run"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/empty/../run"], "already holds a run"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/images"], "is a folder of other files (notes.png)"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/ckpt/text.pt"], "is a file, not a folder"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir=/proc/cnnrnn/run"], "Cannot create the run folder /proc/cnnrnn/run"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/${{nope}}"], "Cannot resolve hydra.run.dir"),
    (["cnnrnn.train", "-m", "task=cnn", "seed=1,2", "hydra.sweep.dir={bad}/images"], "hydra.sweep.dir="),
    (["cnnrnn.train", "trainer.epochs=${{nope}}"], "Cannot resolve trainer.epochs (Interpolation key 'nope'"),
    (["cnnrnn.train", "seed=-1"], "seed=-1 must be between 0 and 2147483647"),
    (["cnnrnn.train", "seed=1099511627776"], "seed=1099511627776 must be between 0 and"),
    (["cnnrnn.train", "data.seed=4294967296"], "data.seed=4294967296 must be between 0 and"),
    (["cnnrnn.train", "optim.lr=inf"], "optim.lr=inf must be a finite number"),
    (["cnnrnn.train", "optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["cnnrnn.train", "optim.warmup_epochs=-inf"], "optim.warmup_epochs=-inf must be a finite number"),
    (["cnnrnn.train", "optim.name=sgd", "optim.momentum=0"], "optim.momentum=0.0 must be in (0, 1)"),
    (["cnnrnn.train", "optim.momentum=1.5"], "optim.momentum=1.5 must be in (0, 1)"),
    (["cnnrnn.train", "task=cnn", "model.hidden=0"], "model.hidden=0 must be at least 1"),
    (["cnnrnn.train", "task=lstm", "model.hidden=0"], "model.hidden=0 must be at least 1"),
    (["cnnrnn.train", "task=lstm", "model.layers=0"], "model.layers=0 must be at least 1"),
    (["cnnrnn.train", "task=multilabel", "model.channels=[0,64]"], "model.channels=[0, 64] must be at least 1"),
    (["cnnrnn.train", "task=multilabel_bce", "model.cell_dim=-4"], "model.cell_dim=-4 must be at least 1"),
    (["cnnrnn.train", "task=cnn", "model.channels=[8,8,8,8,8,8]"], "make a model that torch rejects"),
    (["cnnrnn.train", "task=multilabel", "oracle.ckpt={bad}/ckpt/missing.pt"], "does not exist"),
    (["cnnrnn.train", "task=multilabel_bce", "oracle.ckpt={bad}/ckpt/alien.pt"], "do not fit a lstm model"),
    # data-parallel (issue 11)
    (["cnnrnn.train", "trainer.amp=maybe"], "trainer.amp='maybe' must be of type bool"),
    *([(["cnnrnn.train", "trainer.device=cuda", "trainer.amp=false", "hydra.run.dir={bad}/runs/cuda"],
        "no CUDA device is available")] if not torch.cuda.is_available() else []),
    # inference (issue 11)
    (["cnnrnn.evaluate", "{bad}/ckpt/full.pt", "--oracle", "{bad}/ckpt/full.pt"], "--oracle scores multi-label"),
    (["cnnrnn.evaluate", "{bad}/exported.onnx"], "evaluate reads checkpoints"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "/dev/null"], "/dev/null is not a regular file"),
    (["cnnrnn.export", "{bad}/ckpt/full.pt", "{bad}/images/notes.png/m.onnx"], "is a file, not a folder"),
    (["cnnrnn.compare", "{bad}/run", "--out", "{bad}/images/notes.png/out"], "is a file, not a folder"),
    (["cnnrnn.bench", "--steps", "0"], "--steps 0 must be at least 1"),
    (["cnnrnn.bench", "--batch-sizes", "32,-4"], "each must be between 1 and"),
    (["cnnrnn.bench", "--json", "{bad}/missing/bench.json"], "does not exist; create it first"),
    *([] if torch.cuda.is_available() else [
        (["cnnrnn.evaluate", "{bad}/ckpt/full.pt", "--device", "cuda"], "no CUDA device is available"),
        (["cnnrnn.bench", "--device", "cuda"], "no CUDA device is available")]),
]


@pytest.fixture(scope="module")
def refusals(bad_inputs, tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """Every BAD command, run as a user would (forked from one interpreter that paid the start-up once)."""
    return run_commands([[a.format(bad=bad_inputs) for a in args] for args, _ in BAD], tmp_path_factory.mktemp("walk"))


@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a[1:])[:40] for a, _ in BAD])
def test_bad_input_gets_one_clear_sentence(refusals, case):
    proc, words = refusals[case], BAD[case][1]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and words in errors[0], proc.stderr
    assert errors[0].rstrip().endswith((".", ")")), "one sentence"


def test_nothing_is_overwritten_by_a_refused_run(bad_inputs):
    before = sorted(p.name for p in (bad_inputs / "run").iterdir())
    cli("cnnrnn.train", f"hydra.run.dir={bad_inputs / 'run'}")
    assert sorted(p.name for p in (bad_inputs / "run").iterdir()) == before
    assert (bad_inputs / "run" / "metrics.json").read_text() == "{}"


# --- checkpoints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["write", "flush", "replace", "fsync_dir"])
def test_an_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch, stage):
    """A kill at each stage of save_checkpoint leaves a whole file: the previous one up to the rename, the new
    one after it (the directory fsync only makes the rename durable), and no temporary file."""
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})

    class Killed(BaseException):
        """Like a kill: not an Exception, so nothing on the way can swallow it."""

    def die(*args, **kwargs):
        raise Killed

    killed_at = []
    if stage == "write":  # die after half the bytes
        real_save = torch.save

        def half_save(obj, f):
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            raise Killed
        monkeypatch.setattr(torch, "save", half_save)
    elif stage == "flush":  # the temporary file's fsync, before the rename
        monkeypatch.setattr(engine.os, "fsync", die)
    elif stage == "fsync_dir":  # the file's fsync goes through; the kill comes at the directory's
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                killed_at.append(fd)
                die()
            real_fsync(fd)
        monkeypatch.setattr(engine.os, "fsync", fsync)
    else:
        monkeypatch.setattr(engine.os, "replace", die)
    with pytest.raises(Killed):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    if stage == "fsync_dir":
        assert killed_at, "save_checkpoint never fsynced the directory"
        assert load_checkpoint(path)["epoch"] == 2  # renamed into place already, whole
    else:
        assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"format": engine.CHECKPOINT_FORMAT, "model": Evil()}, path)
    with pytest.raises(UserError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(fake_root, tmp_path, monkeypatch):
    from cnnrnn import tasks
    real_loss = tasks.Classification.loss
    calls = []

    def loss(self, model, batch):
        value, stats = real_loss(self, model, batch)
        calls.extend([1] if model.training else [])
        return (value * float("nan") if len(calls) == 13 else value), stats  # step 3 of epoch 2

    monkeypatch.setattr(tasks.Classification, "loss", loss)
    with pytest.raises(UserError, match=r"became nan at step 13 \(epoch 2\).*last good state"):
        run(compose_config(["task=cnn", *tiny(fake_root, "data.train_eval_size=0")]), tmp_path / "run")
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_resuming_a_finished_run_changes_nothing(fake_root, tmp_path):
    out = tmp_path / "run"
    first = run(compose_config(["task=cnn", *tiny(fake_root)]), out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(compose_config(["task=cnn", *tiny(fake_root), f"resume={out}"]), "unused")
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp


# --- kill and resume (real data, subprocesses) ----------------------------------------------------------------

RESUME_ARGS = ["task=cnn", "trainer.epochs=3", "data.limit=1500", "data.val_size=500", "data.train_eval_size=300",
               "trainer.progress=false", "trainer.threads=1"]


def start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "cnnrnn.train", *RESUME_ARGS, *extra, f"hydra.run.dir={out}"], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train/ms_per_step", "wall_time_s")}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """Runs stopped by SIGKILL, SIGINT and SIGTERM after their first checkpoint, then resumed, beside an
    uninterrupted one; all at once, as each is mostly start-up. Per signal: the stopped process's return code
    and stderr, its run dir and the resume's result; under "uninterrupted": that run's metrics."""
    base = tmp_path_factory.mktemp("interrupted")
    reference = start(base / "uninterrupted")
    runs = {sig: (base / sig.name, start(base / sig.name)) for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)}
    due, sent, deadline = {}, set(), time.time() + 120
    while len(sent) < len(runs):  # each is signalled on its own clock, from its first checkpoint
        for sig, (out, proc) in runs.items():
            if sig in sent:
                continue
            assert proc.poll() is None, proc.stderr.read()
            if sig not in due and (out / "checkpoints" / "last.pt").exists():
                # SIGINT and SIGTERM 0.3 s later: somewhere in epoch 2, or in its evaluation
                due[sig] = time.time() + (0.0 if sig == signal.SIGKILL else 0.3)
            if sig in due and time.time() >= due[sig]:
                proc.send_signal(sig)
                sent.add(sig)
        assert time.time() < deadline, "a run never wrote its first checkpoint"
        time.sleep(0.02)
    stopped = {}
    for sig, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=120)
        stopped[sig] = proc.returncode, err, (out / "metrics.json").exists()
    resumes = {sig: subprocess.Popen([PYTHON, "-m", "cnnrnn.train", *(RESUME_ARGS if sig != signal.SIGKILL else []),
                                      f"resume={out}"], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for sig, (out, _) in runs.items()}
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    results = {"uninterrupted": json.loads((base / "uninterrupted" / "metrics.json").read_text())}
    for sig, proc in resumes.items():
        _, err = proc.communicate(timeout=300)
        results[sig] = (*stopped[sig], runs[sig][0], proc.returncode, err)
    return results


@needs_real_data
def test_sigkill_then_resume_gives_the_uninterrupted_metrics(interrupted):
    _, _, finished_early, out, code, err = interrupted[signal.SIGKILL]
    assert not finished_early
    assert code == 0, err
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(interrupted["uninterrupted"])
    steps = [s for s, _ in scalar(out, "train/loss")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 3 * (1500 // 128)  # no duplicates
    assert [s for s, _ in scalar(out, "val/acc")] == [11, 22, 33]
    finished = cli("cnnrnn.train", f"resume={out}")
    assert finished.returncode == 0 and "is finished" in finished.stderr


@needs_real_data
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_says_so_and_resumes_exactly(interrupted, sig):
    returncode, err, _, out, code, resume_err = interrupted[sig]
    assert returncode == 128 + sig, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "Stopped by" in line]
    assert len(said) == 1 and signal.Signals(sig).name in said[0] and "resume=" in said[0]
    assert code == 0, resume_err
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(interrupted["uninterrupted"])
