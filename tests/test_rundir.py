"""Run folders: claimed and locked before any work, never shared, cleaned up after a refusal."""
from __future__ import annotations

import os
import threading

import pytest
from conftest import files_in

from cnnrnn import rundir
from cnnrnn.errors import UserError


def test_a_new_folder_is_created_and_locked(tmp_path):
    first = rundir.claim(tmp_path / "a" / "b")
    assert first.path.is_dir() and first.created == [tmp_path / "a", tmp_path / "a" / "b"]
    with pytest.raises(UserError, match="is being written by another run that is still going"):
        rundir.claim(tmp_path / "a" / ".." / "a" / "b")  # another spelling, another open file: still refused
    first.release()
    rundir.claim(tmp_path / "a" / "b").release()  # empty again once released: claimable


def test_a_lock_held_for_a_moment_is_waited_for(tmp_path):
    """Two commands looking at one folder at once: the one that waits sees the folder, not a phantom run."""
    first = rundir.claim(tmp_path / "run")
    threading.Timer(0.3, first.release).start()
    rundir.claim(tmp_path / "run").release()


def test_an_empty_folder_is_claimed_but_not_removed(tmp_path):
    claim = rundir.claim(tmp_path)
    assert claim.created == []
    claim.remove_if_unused()
    assert tmp_path.is_dir()


def test_a_folder_of_user_files_is_refused_and_untouched(tmp_path):
    (tmp_path / "curves.png").write_text("mine")
    with pytest.raises(UserError, match=r"is a folder of other files \(curves.png\)"):
        rundir.claim(tmp_path)
    assert files_in(tmp_path) == {"curves.png": b"mine"}


def test_a_run_a_file_and_an_impossible_place_are_refused(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a run .*stopped before its first checkpoint"):
        rundir.claim(tmp_path / "run")
    (tmp_path / "done" / "checkpoints").mkdir(parents=True)
    (tmp_path / "done" / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(UserError, match="already holds a run, which this one would mix with; .*resume="):
        rundir.claim(tmp_path / "done")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        rundir.claim(tmp_path / "file")
    with pytest.raises(UserError, match="Cannot create the run folder"):
        rundir.claim(tmp_path / "file" / "sub")
    (tmp_path / "sweep" / "0-seed=1" / ".hydra").mkdir(parents=True)
    with pytest.raises(UserError, match="already holds a sweep"):
        rundir.claim(tmp_path / "sweep", "hydra.sweep.dir")


def test_a_refused_run_removes_what_it_wrote_and_the_folders_it_made_only(tmp_path):
    claim = rundir.claim(tmp_path / "new" / "run")
    (claim.path / ".hydra").mkdir()
    (claim.path / ".hydra" / "config.yaml").write_text("task: cnn")
    (claim.path / "train.log").write_text("log")
    claim.remove_all()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    kept = rundir.claim(tmp_path / "mine")             # found empty: emptied again, but not removed
    (kept.path / "train.log").write_text("log")
    kept.remove_all()
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def test_a_sweep_folder_with_only_hydras_file_left_is_removed(tmp_path):
    claim = rundir.claim(tmp_path / "sweep", "hydra.sweep.dir")
    (claim.path / rundir.SWEEP_FILE).write_text("hydra")
    claim.remove_if_unused()
    assert not (tmp_path / "sweep").exists()
    claim = rundir.claim(tmp_path / "sweep2", "hydra.sweep.dir")
    (claim.path / "0-seed=1").mkdir()
    claim.remove_if_unused()                             # a job started: kept
    assert (tmp_path / "sweep2" / "0-seed=1").is_dir()


def test_a_resumed_run_and_a_sweep_job_are_locked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    held = rundir.lock_existing(run)
    with pytest.raises(UserError, match="resume=.* is being written by another process right now"):
        rundir.lock_existing(run)
    held.release()
    rundir.lock_existing(run).release()
    job = tmp_path / "0-seed=1"
    job.mkdir()
    claim = rundir.lock_job(job)
    with pytest.raises(UserError, match="already belongs to another job of this sweep"):
        rundir.lock_job(job)
    claim.release()
    (job / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="already belongs to another job"):
        rundir.lock_job(job)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_that_cannot_be_written_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot be written"):
            rundir.claim(folder)
    finally:
        folder.chmod(0o755)
