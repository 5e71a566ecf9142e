"""Checkpoints: atomic writes, weights_only reads, checksummed bytes, checked fields, RNG states."""
from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch
from conftest import half_writer

from cnnrnn import checkpoint, files
from cnnrnn.errors import UserError


class Killed(BaseException):
    """Like a kill: not an Exception, so nothing on the way can swallow it."""


def die(*args, **kwargs):
    raise Killed


def test_a_saved_checkpoint_loads_with_its_format_and_a_run_dir_stands_for_its_best_pt(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "config": {"task": "cnn"}, "state": {"epoch": 2}}
    checkpoint.save(tmp_path / "run" / "checkpoints" / "best.pt", state)
    loaded = checkpoint.load(tmp_path / "run")
    assert loaded["format"] == checkpoint.FORMAT and torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["state"] == {"epoch": 2}
    checkpoint.save(tmp_path / "flat" / "best.pt", state)
    assert checkpoint.load(tmp_path / "flat")["config"] == {"task": "cnn"}


@pytest.mark.parametrize("stage", ["write", "flush", "replace", "fsync_dir"])
def test_an_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch, stage):
    """A kill at each stage of save leaves a whole file (the new one only after the rename) and no temporary file."""
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1, "w": torch.ones(1000)})
    killed_at = []
    if stage == "write":  # die after half the bytes
        monkeypatch.setattr(files, "open", half_writer(Killed()), raising=False)
    elif stage == "flush":  # the temporary file's fsync, before the rename
        monkeypatch.setattr(files.os, "fsync", die)
    elif stage == "fsync_dir":  # the file's fsync goes through; the kill comes at the directory's
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                killed_at.append(fd)
                die()
            real_fsync(fd)
        monkeypatch.setattr(files.os, "fsync", fsync)
    else:
        monkeypatch.setattr(files.os, "replace", die)
    with pytest.raises(Killed):
        checkpoint.save(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    if stage == "fsync_dir":
        assert killed_at, "save never fsynced the directory"
        assert checkpoint.load(path)["epoch"] == 2  # renamed into place already, whole
    else:
        assert checkpoint.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"epoch": 1})

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(UserError, match=r"Cannot write the checkpoint .*last.pt \(No space left on device\); the "
                                        r"previous last.pt is intact; free space or fix the folder, then resume"):
        checkpoint.save(path, {"epoch": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": Evil()}, path)
    with pytest.raises(UserError, match="could run code"):
        checkpoint.load(path)
    assert not marker.exists()


def test_a_flipped_byte_inside_a_tensor_is_refused_as_damaged(tmp_path):
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"model": {"w": torch.full((4096,), 1.5)}})
    raw = bytearray(path.read_bytes())
    pattern = torch.full((64,), 1.5).numpy().tobytes()
    at = raw.index(pattern) + 100                       # inside the tensor's bytes, not the archive's directory
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as refused:
        checkpoint.load(path)
    assert str(refused.value).startswith(f"{path} is damaged") and "use another checkpoint of that run" in str(
        refused.value)


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "does not exist; give the path of a .pt file"),
    (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p: p.write_text("not a checkpoint"), "is not a readable checkpoint"),
    (lambda p: torch.save({"weights": torch.zeros(3)}, p), "is a PyTorch file but not a cnnrnn checkpoint"),
])
def test_what_is_not_a_checkpoint_is_named_in_one_sentence(tmp_path, make, words):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(UserError) as refused:
        checkpoint.load(path)
    assert str(refused.value).count(str(path)) == 1 and words in str(refused.value)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    full = tmp_path / "full.pt"
    checkpoint.save(full, {"model": {"w": torch.zeros(1000)}})
    (tmp_path / "half.pt").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(UserError, match="half.pt is not a readable checkpoint"):
        checkpoint.load(tmp_path / "half.pt")


def test_fields_are_read_checked_and_name_the_file(tmp_path):
    path = tmp_path / "best.pt"
    state = {"config": "task: cnn", "epochs": True, "summary": {"a": 1}}
    with pytest.raises(UserError) as refused:
        checkpoint.entry(state, "config", dict, path)
    assert str(refused.value) == (f"{path} holds a 'config' of type str, which a cnnrnn checkpoint never has; the "
                                  f"file was altered or made elsewhere.")
    with pytest.raises(UserError, match="has no 'model' field; it is not a complete cnnrnn checkpoint"):
        checkpoint.entry(state, "model", dict, path)
    with pytest.raises(UserError, match="a 'epochs' of type bool"):
        checkpoint.entry(state, "epochs", int, path)          # a bool is no count
    assert checkpoint.entry(state, "task_state", dict, path, default={}) == {}
    assert checkpoint.entry(state, "summary", dict, path) == {"a": 1}


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    checkpoint.save(tmp_path / "rng.pt", {"rng": checkpoint.rng_state()})
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
