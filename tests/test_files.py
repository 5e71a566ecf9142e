"""write_atomic: the previous file or the new one, never torn; stale temporaries; strict JSON; output checks."""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from conftest import half_writer

from cnnrnn import files
from cnnrnn.errors import UserError


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_bytes_text_and_a_writer_function_land_whole(tmp_path):
    assert files.write_atomic(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    files.write_atomic(tmp_path / "sub" / "b.txt", "text")                     # its folder is made
    files.write_atomic(tmp_path / "c.txt", lambda tmp: tmp.write_text("by the writer"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "sub" / "b.txt").read_text() == "text"
    assert (tmp_path / "c.txt").read_text() == "by the writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.txt", "sub"]  # no temporary file left


def test_a_full_disk_at_fsync_keeps_the_previous_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "table.md"
    files.write_atomic(path, "old")
    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(UserError) as refused:
        files.write_atomic(path, "new", what="the table", then="free some space, then compare again")
    monkeypatch.undo()
    assert str(refused.value) == (f"Cannot write the table {path} (No space left on device); the previous table.md "
                                  f"is intact; free some space, then compare again.")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_a_failing_open_or_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    files.write_atomic(path, "{}")
    monkeypatch.setattr(files, "open", half_writer(OSError(errno.ENOSPC, "No space left on device")), raising=False)
    with pytest.raises(UserError, match="No space left on device.*the previous out.json is intact"):
        files.write_atomic(path, '{"a": 1}')
    monkeypatch.setattr(files, "open", full_disk, raising=False)
    with pytest.raises(UserError, match="the previous out.json is intact"):
        files.write_atomic(path, '{"a": 1}')
    monkeypatch.undo()
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failure_without_a_previous_file_says_none_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(UserError, match=r"no new.txt was written; free some space or choose a folder you can write"):
        files.write_atomic(tmp_path / "new.txt", "x")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="Cannot write"):
        files.write_atomic(tmp_path / "file" / "under.txt", "x")  # its folder is a file


def test_temporary_files_of_a_killed_write_are_removed(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / f".last.pt.{dead.pid}.tmp", tmp_path / f".last.pt.{os.getppid()}.tmp"
    foreign = tmp_path / ".last.pt.backup.tmp"
    for f in (stale, live, foreign):
        f.write_bytes(b"half")
    files.write_atomic(tmp_path / "last.pt", b"whole")
    assert not stale.exists() and live.exists() and foreign.exists()  # a live process's write is left alone


def test_strict_json_turns_nan_and_infinity_into_null():
    text = files.strict_json({"test/map": float("nan"), "test/loss": float("inf"), "params": 3})
    assert text == '{"test/map": null, "test/loss": null, "params": 3}'
    assert json.loads(files.strict_json({"a": 0.5}, indent=2)) == {"a": 0.5}


def test_an_output_path_is_checked_before_any_work(tmp_path):
    assert files.check_writable(str(tmp_path / "out.json"), "--json x", "bench.json") == tmp_path / "out.json"
    with pytest.raises(UserError, match=f"--json x is a folder; give a file path, e.g. {tmp_path / 'bench.json'}"):
        files.check_writable(str(tmp_path), "--json x", "bench.json")
    with pytest.raises(UserError, match="the folder .*missing does not exist; create it first"):
        files.check_writable(str(tmp_path / "missing" / "out.json"), "--json x", "bench.json")
    assert files.check_writable(str(tmp_path / "a" / "b" / "m.onnx"), "m.onnx", "m.onnx", make_folder=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder; choose another path"):
        files.check_writable(str(tmp_path / "file" / "a" / "m.onnx"), "out", "m.onnx", make_folder=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="permission denied"):
            files.check_writable(str(folder / "x.json"), "--json x", "x.json")
    finally:
        folder.chmod(0o755)
