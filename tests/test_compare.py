"""python -m cnnrnn.compare: the runs table, the overlaid curves, the context table, refusals in one sentence."""
from __future__ import annotations

import json

import pytest
import yaml

from cnnrnn import compare
from cnnrnn.cli import compose_config
from cnnrnn.train import run
from conftest import tiny


def run_compare(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def fake_run(folder, config: dict, metrics: dict, hydra: bool = True):
    """A finished run as compare reads it: metrics.json and .hydra/config.yaml (no TensorBoard events)."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    if hydra:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_compare_two_real_runs_single_and_multi_label(fake_root, tmp_path, capsys):
    runs = tmp_path / "runs"
    run(compose_config(["task=cnn", *tiny(fake_root, "trainer.epochs=1", "model.channels=[4,8]")]), runs / "cnn")
    oracle = f"oracle.ckpt={runs / 'cnn' / 'checkpoints' / 'best.pt'}"  # the cnn just trained: no second one
    small = ["model.channels=[4,8]", "model.cell_dim=16", "model.hidden=32"]
    run(compose_config(["task=multilabel", *tiny(fake_root, "trainer.epochs=2", "data.test_size=100", *small, oracle)]),
        runs / "decoder")
    code, out, err = run_compare(capsys, runs, "--out", tmp_path / "report")
    assert code == 0, err
    table = (tmp_path / "report" / "table.md").read_text()
    assert out.strip() == table.strip()
    single, multi = table.split("### Multi-label")
    assert "| `cnn` | cnn |" in single and "**test acc**" in single and "`decoder`" not in single  # config: last.pt
    assert "`decoder`" in multi and "exact match" in multi and "tile oracle f1_samples" in multi
    metrics = json.loads((runs / "decoder" / "metrics.json").read_text())
    row = next(line for line in multi.splitlines() if "`decoder`" in line)
    assert f"{metrics['test/f1_samples']:.4f}" in row and "2 (" in row and metrics["hardware"] in row
    png = tmp_path / "report" / "curves.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "report" / "context.md").exists()  # one degrade level: no context table
    # explicit run dirs, wall time on x, the current folder as default output
    code, out, err = run_compare(capsys, runs / "cnn", runs / "decoder", "--x", "time", "--out", tmp_path / "b")
    assert code == 0 and "`cnn`" in out and "`decoder`" in out and (tmp_path / "b" / "curves.png").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no run"),
    (lambda d: (d / "job" / ".hydra").mkdir(parents=True) or d / "job", "has no metrics.json"),
    (lambda d: (d / "sweep" / "0-seed=0" / "checkpoints").mkdir(parents=True) or d / "sweep",
     "0-seed=0 has no metrics"),
    (lambda d: d / "no-match-*", "matches nothing"),
])
def test_missing_empty_and_unfinished_runs_are_named_in_one_sentence(tmp_path, capsys, make, message):
    code, out, err = run_compare(capsys, make(tmp_path))
    assert code == 2 and message in err and "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1


def test_compare_does_not_overwrite_a_runs_own_curves(tmp_path, capsys):
    one = fake_run(tmp_path / "one", {"task": "cnn"}, {"test/acc": 0.9})
    code, _, err = run_compare(capsys, one, "--out", one)
    assert code == 2 and "is a run dir" in err


CONTEXT = {  # arm -> (config overrides, test f1_samples at degrade 0 / 0.5)
    "decoder": ({"task": "multilabel", "model": {"name": "cnn_rnn", "feedback": True}}, (0.95, 0.85)),
    "no_feedback": ({"task": "multilabel", "model": {"name": "cnn_rnn", "feedback": False}}, (0.93, 0.80)),
    "bce": ({"task": "multilabel_bce", "model": {"name": "cnn_bce"}}, (0.92, 0.78)),
}


def context_sweep(folder):
    """The +experiment=context grid as hand-written runs: three arms x two degrade levels, oracle/ inside."""
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
        fake_run(job / "oracle", {"task": "cnn"}, {"test/acc": 0.9}, hydra=False)  # skipped: the oracle's cnn
    return folder


def test_context_table_on_a_context_sweep(tmp_path, capsys):
    sweep = context_sweep(tmp_path / "context")
    code, out, err = run_compare(capsys, sweep)
    assert code == 0, err
    md = (sweep / "context.md").read_text()
    assert md in out and (sweep / "table.md").is_file() and (sweep / "context.png").read_bytes()[:4] == b"\x89PNG"
    lines = [line for line in md.splitlines() if line.startswith("|")]
    header, rows = lines[0], {line.split("|")[1].strip(): line for line in lines[2:]}
    assert "f1_samples (degrade 0)" in header and "exact match (degrade 0.5)" in header and "grounding" in header
    assert list(rows) == ["decoder", "decoder, no feedback", "BCE", "tile oracle"]
    cells = lambda row: [c.strip() for c in rows[row].split("|")[2:-1]]  # noqa: E731
    # per level: f1_samples, exact match, grounding
    assert cells("decoder") == ["0.9500", "0.8500", "0.7000", "0.8500", "0.7500", "0.7100"]
    assert cells("decoder, no feedback")[:2] == ["0.9300", "0.8300"] and cells("BCE")[2] == "–"
    assert cells("tile oracle") == ["0.9000", "0.8000", "–", "0.7000", "0.6000", "–"]
    table = (sweep / "table.md").read_text()
    assert table.count("| `") == 6 and "oracle`" not in table  # six jobs; their oracle/ folders are no runs
    assert (sweep / "curves.png").is_file()


def test_runs_of_one_degrade_level_have_no_context_table(tmp_path, capsys):
    sweep = tmp_path / "s"
    for name, (config, f1) in CONTEXT.items():
        fake_run(sweep / name, {**config, "data": {"degrade": 0.0}}, {"test/f1_samples": f1[0]})
    code, out, _ = run_compare(capsys, str(sweep / "*"), "--out", tmp_path / "r")
    assert code == 0 and "### Multi-label" in out and "Context" not in out
    assert not (tmp_path / "r" / "context.md").exists()
