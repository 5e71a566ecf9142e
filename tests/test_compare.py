"""python -m cnnrnn.compare: tables and curves; bad runs left out; only its own files written; the context experiment's
table (docs/experiments/context.py) from the same runs."""
from __future__ import annotations

import json
import logging
import runpy
import shutil
import sys

import pytest
import yaml
from conftest import ROOT, run_main

from cnnrnn import compare

CONTEXT = {  # arm -> (config, test f1_samples at degrade 0 / 0.5)
    "decoder": ({"task": "multilabel", "model": {"feedback": True}}, (0.95, 0.85)),
    "no_feedback": ({"task": "multilabel", "model": {"feedback": False}}, (0.93, 0.80)),
    "bce": ({"task": "multilabel_bce", "model": {}}, (0.92, 0.78)),
}


def fake_run(folder, config: dict, metrics, hydra: bool = True):
    """A finished run as compare reads it: metrics.json and .hydra/config.yaml (no TensorBoard events)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if hydra:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def runs(cnn_run, multilabel_run, tmp_path):
    """Copies of the session's finished cnn and multilabel runs, side by side in one folder."""
    folder = tmp_path / "runs"
    shutil.copytree(cnn_run[0], folder / "cnn")
    shutil.copytree(multilabel_run[0], folder / "decoder")
    return folder


def test_compare_two_real_runs_single_and_multi_label(runs, tmp_path, capsys):
    code, out, err = run_main(capsys, compare.main, runs, "--out", tmp_path / "report")
    assert code == 0, err
    table = (tmp_path / "report" / "table.md").read_text()
    assert out.strip() == table.strip()
    single, multi = table.split("### Multi-label")
    assert "| `cnn` | cnn |" in single and "**test acc**" in single and "`decoder`" not in single
    assert "`decoder`" in multi and "exact match" in multi and "tile oracle f1_samples" in multi
    metrics = json.loads((runs / "decoder" / "metrics.json").read_text())
    row = next(line for line in multi.splitlines() if "`decoder`" in line)
    assert f"{metrics['test/f1_samples']:.4f}" in row and "2 (" in row and metrics["hardware"] in row
    png = tmp_path / "report" / "curves.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    # explicit run dirs, wall time on x
    code, out, err = run_main(capsys, compare.main, runs / "cnn", runs / "decoder", "--x", "time", "--out",
                              tmp_path / "b")
    assert code == 0 and "`cnn`" in out and "`decoder`" in out and (tmp_path / "b" / "curves.png").is_file()


def test_the_config_comes_from_last_pt_when_hydras_file_is_gone(runs, tmp_path, capsys):
    shutil.rmtree(runs / "cnn" / ".hydra", ignore_errors=True)
    code, out, err = run_main(capsys, compare.main, runs / "cnn", "--out", tmp_path / "r")
    assert code == 0, err
    assert "| `cnn` | cnn |" in out


def test_the_one_folder_given_is_where_the_report_goes_and_compare_may_write_there_again(runs, capsys):
    for _ in range(2):  # the second time over its own files: they are compare's to replace
        code, out, err = run_main(capsys, compare.main, runs)
        assert code == 0, err
    assert {"table.md", "curves.png", ".compare"} <= {p.name for p in runs.iterdir()}
    assert set((runs / ".compare").read_text().split()) == {"table.md", "curves.png"}


def test_compare_refuses_to_write_over_a_users_own_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "job", {"task": "cnn"}, {"test/acc": 0.9})
    (sweep / "table.md").write_text("my own notes")
    code, out, err = run_main(capsys, compare.main, sweep)
    assert code == 2 and out == ""
    assert err == (f"error: --out {sweep} holds a table.md that compare did not write, or a .compare of another "
                   f"tool; choose a new folder with --out, so that nothing of yours is overwritten.\n")
    assert (sweep / "table.md").read_text() == "my own notes" and not (sweep / "curves.png").exists()


def test_unfinished_and_unreadable_runs_are_left_out_with_a_warning(tmp_path, capsys, caplog):
    sweep = tmp_path / "sweep"
    fake_run(sweep / "0-seed=0", {"task": "cnn"}, {"test/acc": 0.9, "params": 10, "note": "text", "flag": True})
    (sweep / "1-seed=1" / "checkpoints").mkdir(parents=True)                  # stopped before it finished
    fake_run(sweep / "2-seed=2", {"task": "cnn"}, [0.9, 0.8])                   # metrics.json not an object
    with caplog.at_level(logging.WARNING, "cnnrnn"):
        code, out, err = run_main(capsys, compare.main, sweep, "--out", tmp_path / "r")
    assert code == 0, err
    assert "`0-seed=0`" in out and "1-seed=1" not in out and "2-seed=2" not in out
    assert "left out: " in caplog.text and "1-seed=1 has no metrics.json" in caplog.text
    assert "2-seed=2/metrics.json holds a list, not an object of metrics" in caplog.text
    assert "2 entries that are not numbers left out" in caplog.text


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no run"),
    (lambda d: (d / "job" / ".hydra").mkdir(parents=True) or d / "job", "has no metrics.json"),
    (lambda d: (d / "sweep" / "0-seed=0" / "checkpoints").mkdir(parents=True) or d / "sweep",
     "0-seed=0 has no metrics"),
    (lambda d: d / "no-match-*", "matches nothing"),
    (lambda d: (fake_run(d / "bad", {}, {}).joinpath("metrics.json").write_text("{oops"), d / "bad")[1],
     "has a readable metrics.json"),
])
def test_missing_empty_and_unfinished_runs_are_named_in_one_sentence(tmp_path, capsys, make, message):
    code, out, err = run_main(capsys, compare.main, make(tmp_path), "--out", tmp_path / "report")
    assert code == 2 and message in err and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "report").exists()


def test_compare_does_not_overwrite_a_runs_own_curves(tmp_path, capsys):
    one = fake_run(tmp_path / "one", {"task": "cnn"}, {"test/acc": 0.9})
    code, _, err = run_main(capsys, compare.main, one, "--out", one)
    assert code == 2 and "is a run dir" in err


def test_compare_refuses_an_out_folder_under_a_file_before_reading_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(capsys, compare.main, tmp_path / "no-such-run", "--out", tmp_path / "file" / "sub")
    assert code == 2
    assert err.strip() == (f"error: --out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder; "
                           f"choose another folder with --out.")


def context_sweep(folder, reader_inside: bool = False):
    """The +experiment=context grid as hand-written runs: three arms x two degrade levels."""
    for j, (level_i, level) in enumerate([(0, 0.0), (1, 0.5)] * 3):
        name = list(CONTEXT)[j // 2]
        config, f1 = CONTEXT[name]
        metrics = {"test/f1_samples": f1[level_i], "test/exact_match": f1[level_i] - 0.1, "test/f1_micro": 0.9,
                   "params": 1000, "epochs": 10, "best_epoch": 9, "val/f1_samples_best": 0.9,
                   "oracle/f1_samples": 0.9 - level_i * 0.2, "oracle/exact_match": 0.8 - level_i * 0.2}
        if name != "bce":
            metrics["test/grounding"] = 0.7 + level_i * 0.01
        job = fake_run(folder / f"{j}-+arm={name},data.degrade={level}",
                       {**config, "data": {"degrade": level, "scene": "outfit"}}, metrics)
        if reader_inside:  # reader.cache=null: each job's reader in RUN_DIR/reader
            fake_run(job / "reader", {"task": "reader"}, {"test/acc": 0.9}, hydra=False)
    return folder


def test_context_table_on_a_context_sweep(tmp_path, capsys, monkeypatch):
    sweep = context_sweep(tmp_path / "context")
    monkeypatch.setattr(sys, "argv", ["context.py", str(sweep)])
    runpy.run_path(str(ROOT / "docs" / "experiments" / "context.py"), run_name="__main__")
    md = (sweep / "context.md").read_text()
    assert md in capsys.readouterr().out and (sweep / "context.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header, rows = lines[0], {line.split("|")[1].strip(): line for line in lines[2:]}
    assert "f1_samples (degrade 0)" in header and "exact match (degrade 0.5)" in header and "grounding" in header
    assert list(rows) == ["decoder", "decoder, no feedback", "BCE", "tile oracle"]
    cells = lambda row: [c.strip() for c in rows[row].split("|")[2:-1]]  # noqa: E731
    # per level: f1_samples, exact match, grounding
    assert cells("decoder") == ["0.9500", "0.8500", "0.7000", "0.8500", "0.7500", "0.7100"]
    assert cells("decoder, no feedback")[:2] == ["0.9300", "0.8300"] and cells("BCE")[2] == "–"
    assert cells("tile oracle") == ["0.9000", "0.8000", "–", "0.7000", "0.6000", "–"]


def test_a_reader_trained_inside_a_run_is_no_run_of_the_comparison(tmp_path, capsys):
    sweep = context_sweep(tmp_path / "context", reader_inside=True)
    code, _, err = run_main(capsys, compare.main, sweep)
    assert code == 0, err
    table = (sweep / "table.md").read_text()
    assert table.count("| `") == 6 and "reader`" not in table


@pytest.mark.parametrize("name, content, words", [
    (".hydra/config.yaml", b"task: cnn", "is a run dir or a cache of readers"),          # a stopped run
    (".reader-1234.lock", b"", "is a run dir or a cache of readers"),                    # the reader cache
    (".compare", b"notes.txt\n", "or a .compare of another tool"),
    (".compare", b"\xff\xfe\x00", "or a .compare of another tool"),
])
def test_compare_never_writes_into_a_run_a_cache_or_another_tools_folder(tmp_path, capsys, name, content, words):
    run = fake_run(tmp_path / "run", {"task": "cnn", "model": [1]}, {"test/acc": 0.9})
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(content)
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_main(capsys, compare.main, run, "--out", out)
    assert code == 2 and words in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == before
    code, _, err = run_main(capsys, compare.main, run, "--out", tmp_path / "fine")   # the odd config itself is fine
    assert code == 0, err
