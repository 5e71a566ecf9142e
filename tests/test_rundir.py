"""A run directory is claimed before any work and never shared: whatever spelling reaches it, whatever another
process does; a refused run leaves nothing behind; what can be checked before training is; no traceback."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cnnrnn import cli, engine, report, rundir
from cnnrnn.cli import compose_config
from cnnrnn.engine import load_checkpoint, save_checkpoint
from cnnrnn.errors import UserError
from cnnrnn.train import run
from conftest import PYTHON, ROOT, cli_env, needs_real_data, tiny, write_dataset


def train(*args, timeout=180) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "cnnrnn.train", *map(str, args)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def one_sentence(err: str) -> str:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    return errors[0]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- claiming, in-process -----------------------------------------------------------------------------------

def test_a_new_folder_is_created_and_locked(tmp_path):
    first = rundir.claim(tmp_path / "a" / "b")
    assert first.path.is_dir() and first.created == [tmp_path / "a", tmp_path / "a" / "b"]
    with pytest.raises(UserError, match="is being written by another run that is still going"):
        rundir.claim(tmp_path / "a" / ".." / "a" / "b")  # another spelling, another open file: still refused
    first.release()
    rundir.claim(tmp_path / "a" / "b").release()  # empty again once released: claimable


def test_an_empty_folder_is_claimed_but_not_removed(tmp_path):
    claim = rundir.claim(tmp_path)
    assert claim.created == []
    claim.remove_if_unused()
    assert tmp_path.is_dir()


def test_a_folder_of_user_files_is_refused_and_untouched(tmp_path):
    (tmp_path / "curves.png").write_text("mine")
    with pytest.raises(UserError, match=r"is a folder of other files \(curves.png\)"):
        rundir.claim(tmp_path)
    assert files(tmp_path) == {"curves.png": b"mine"}


def test_a_run_a_file_and_an_impossible_place_are_refused(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a run .*stopped before its first checkpoint"):
        rundir.claim(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        rundir.claim(tmp_path / "file")
    with pytest.raises(UserError, match="Cannot create the run folder"):
        rundir.claim(tmp_path / "file" / "sub")
    (tmp_path / "sweep" / "0-seed=1" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a sweep"):
        rundir.claim(tmp_path / "sweep", "hydra.sweep.dir")


# --- the command line: refused before Hydra writes anything ---------------------------------------------------

def test_an_interpolated_run_dir_onto_a_finished_run_is_refused(tmp_path):
    (tmp_path / "cnn" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cnn" / "metrics.json").write_text("{}")
    before = files(tmp_path)
    code, err = finished(train("task=cnn", f"hydra.run.dir={tmp_path}/x/../${{task}}"))
    assert code == 2 and f"hydra.run.dir={tmp_path / 'cnn'} already holds a run" in one_sentence(err)
    assert files(tmp_path) == before and not (tmp_path / "x").exists()


def test_a_sweep_into_an_existing_sweep_is_refused(tmp_path):
    (tmp_path / "0-seed=0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "multirun.yaml").write_text("old")
    before = files(tmp_path)
    code, err = finished(train("-m", "task=cnn", "seed=0,1", f"hydra.sweep.dir={tmp_path}"))
    assert code == 2 and "already holds a sweep" in one_sentence(err)
    assert files(tmp_path) == before


def test_a_run_refused_late_leaves_nothing_behind(tmp_path):
    write_dataset(tmp_path / "data")  # 600 items: refused when the data is read, after Hydra made the folder
    (tmp_path / "empty").mkdir()
    # the first command twice: refused the same way again, as nothing is left that blocks it
    for out in (tmp_path / "new" / "deeper", tmp_path / "new" / "deeper", tmp_path / "empty"):
        code, err = finished(train("task=cnn", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={out}"))
        assert code == 2 and "holds 600 items, expected 60000" in one_sentence(err)
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "empty").iterdir()) == []


@needs_real_data
def test_two_runs_started_at_once_into_one_folder(tmp_path):
    out = tmp_path / "run"
    args = ["task=cnn", "trainer.epochs=1", "data.limit=600", "data.val_size=100", "data.train_eval_size=100",
            "data.test_size=100", "trainer.batch_size=100", "trainer.progress=false", "trainer.threads=1",
            f"hydra.run.dir={out}"]
    procs = [train(*args), train(*args)]
    results = [finished(p) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(err for code, err in results if code == 2)
    assert "is being written by another run" in one_sentence(err) or "already holds a run" in one_sentence(err)
    log = (out / "train.log").read_text()
    assert log.count("task=cnn model=cnn") == 1 and "ERROR" not in log  # one run wrote it all
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # the run's own two (epochs, then hparams)
    assert (out / "metrics.json").is_file() and len(list((out / ".hydra").iterdir())) == 3


# --- resume -------------------------------------------------------------------------------------------------

def stopped_run(folder: Path, done: bool) -> Path:
    """A run folder whose last.pt says it trained 2 epochs of task=cnn (finished or not): no training needed."""
    save_checkpoint(folder / "checkpoints" / "last.pt", {"config": compose_config(["task=cnn"]).to_dict(),
                                                          "epoch": 2, "finished": done})
    return folder


def test_a_changed_override_on_a_finished_run_is_refused(tmp_path, capsys):
    out = stopped_run(tmp_path / "run", done=True)
    with pytest.raises(UserError, match=r"is a finished run \(2 epochs.*trainer.epochs=30 \(its 40\) would change "
                                        r"nothing"):
        cli.check_command_line([f"resume={out}", "trainer.epochs=30"])
    with pytest.raises(SystemExit) as exit_:
        cli.check_command_line([f"resume={out}"])
    assert exit_.value.code == 0 and "nothing to do" in capsys.readouterr().err


def test_a_resumed_run_is_locked(tmp_path):
    out = stopped_run(tmp_path / "run", done=False)
    held = rundir.lock_existing(out)  # as if another process were continuing it
    try:
        with pytest.raises(UserError, match="is being written by another process right now"):
            cli.check_command_line([f"resume={out}"])
    finally:
        held.release()


# --- faults during the run ----------------------------------------------------------------------------------

def test_a_nan_before_any_checkpoint_names_none(fake_root, tmp_path, monkeypatch):
    from cnnrnn import tasks
    real_loss = tasks.Classification.loss
    monkeypatch.setattr(tasks.Classification, "loss",
                        lambda self, model, batch: (real_loss(self, model, batch)[0] * float("nan"), {}))
    with pytest.raises(UserError, match=r"became nan at step 1 \(epoch 1\); stopped, and no checkpoint was written"):
        run(compose_config(["task=cnn", *tiny(fake_root)]), tmp_path / "run")


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1})

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(engine.os, "fsync", full)
    with pytest.raises(UserError, match=r"Cannot write the checkpoint .*last.pt \(No space left on device\); the "
                                        r"previous last.pt is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_temporary_files_of_a_killed_write_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".last.pt.{dead.pid}.tmp", tmp_path / f".last.pt.{os.getppid()}.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"being written")  # a live process's write is left alone
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    assert not stale.exists() and live.exists()


def test_sigterm_in_the_final_evaluation_says_how_to_finish(fake_root, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    real_score_test = report.score_test

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_score_test(*args, **kwargs)
    monkeypatch.setattr(report, "score_test", interrupted)
    with caplog.at_level(logging.WARNING, "cnnrnn"), pytest.raises(SystemExit) as exit_:
        run(compose_config(["task=cnn", *tiny(fake_root, "trainer.epochs=1")]), out)
    assert exit_.value.code == 128 + signal.SIGTERM
    said = [r.getMessage() for r in caplog.records if "during the final test evaluation" in r.getMessage()]
    assert len(said) == 1 and f"resume={out}" in said[0]
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(report, "score_test", real_score_test)
    metrics = run(compose_config(["task=cnn", *tiny(fake_root, "trainer.epochs=1"), f"resume={out}"]), "unused")
    assert (out / "metrics.json").is_file() and 0 <= metrics["test/acc"] <= 1
    assert load_checkpoint(out / "checkpoints" / "last.pt")["finished"]


def test_model_and_optimizer_settings_are_checked_before_any_work():
    from cnnrnn.build import preflight
    for overrides, words in ((["task=cnn", "model.hidden=0"], "model.hidden=0 must be at least 1"),
                             (["task=multilabel", "model.channels=[0,64]"], "must be at least 1 in every entry"),
                             (["task=cnn", "model.channels=[32,32,32,32,32,32]"], "make a model that torch rejects")):
        with pytest.raises(UserError, match=words.replace("[", r"\[")):
            preflight(compose_config(overrides))
