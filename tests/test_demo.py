"""python -m cnnrnn.demo: a reader, a decoder on its frozen features, pictures named, all in one folder."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import PYTHON, cli_env, needs_real_data

from cnnrnn.data.fashion_mnist import CLASSES

# The demo's own main, with its recipe made smaller still: the command's steps, in a minute rather than five.
SMALLER = """
import sys
from cnnrnn import demo
demo.SMALL = {"data": {"limit": 2000, "val_size": 500, "train_eval_size": 200, "test_size": 200},
              "trainer": {"epochs": 2}, "reader": {"epochs": 1}}
demo.main(sys.argv[1:])
"""


@pytest.mark.slow
@needs_real_data
def test_the_demo_trains_writes_pictures_and_names_their_items(tmp_path):
    folder = tmp_path / "demo"
    proc = subprocess.run([PYTHON, "-c", SMALLER, str(folder)], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 8
    for line, i in zip(lines, range(8)):
        assert line["image"] == str(folder / "pictures" / f"composite_{i}.png")
        assert (folder / "pictures" / f"composite_{i}.png").read_bytes()[:4] == b"\x89PNG"
        assert set(line["labels"]) <= set(CLASSES) and 1 <= len(line["true"]) <= 4
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and "oracle/f1_samples" in metrics
    assert len(list(folder.glob("reader-*/checkpoints/best.pt"))) == 1      # the reader is kept in the folder
    assert "test f1_samples" in proc.stderr and str(folder) in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]              # nothing beside it
    again = subprocess.run([PYTHON, "-c", SMALLER, str(folder)], cwd=tmp_path, env=cli_env(), capture_output=True,
                           text=True, timeout=900)   # a demo's folder again: what it trained is reused
    assert again.returncode == 0 and len(again.stdout.splitlines()) == 8, again.stderr[-2000:]
    assert json.loads((folder / "run" / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_the_demo_refuses_a_folder_of_other_files_in_one_sentence(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run([PYTHON, "-m", "cnnrnn.demo", str(tmp_path)], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"error: FOLDER={tmp_path} is a folder of other files (notes.txt), which a run could "
                           f"overwrite; choose a new or empty folder.\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_stopped_demo_is_continued_in_its_folder_and_other_folders_are_refused(tmp_path):
    from cnnrnn import demo
    from cnnrnn.errors import UserError

    held = demo.open_folder(tmp_path / "d")
    assert (held.path / demo.DEMO).is_file()
    with pytest.raises(UserError, match="FOLDER=.* is being written by another process right now"):
        demo.open_folder(tmp_path / "d")                      # a demo still running there
    held.release()
    assert demo.open_folder(tmp_path / "d").path == held.path
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is a folder of other files"):
        demo.open_folder(tmp_path / "mine")
