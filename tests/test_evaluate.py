"""python -m cnnrnn.evaluate: metrics.json recomputed exactly, other grids, bad flags refused first."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_main, tiny, write_checkpoint

from cnnrnn import checkpoint, evaluate, stages
from cnnrnn.config import preset
from cnnrnn.errors import UserError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")


def strict(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))


def same_numbers(printed: dict, saved: dict) -> None:
    assert set(printed) == set(saved)
    for key, value in printed.items():
        if isinstance(value, float):
            assert math.isclose(value, saved[key], rel_tol=0, abs_tol=1e-6), (key, value, saved[key])
        else:
            assert value == saved[key], key


def test_evaluate_prints_every_number_of_metrics_json(fake_root, multilabel_run, capsys):
    """Evaluate's JSON line holds every number of a multi-label run's and of its reader's metrics.json."""
    out, metrics = multilabel_run
    reader = Path(metrics["oracle/ckpt"]).parent.parent
    for folder in (out, reader):
        saved = json.loads((folder / "metrics.json").read_text())
        code, printed, err = run_main(capsys, evaluate.main, folder / "checkpoints" / "best.pt")
        assert code == 0, err
        same_numbers(strict(printed), saved)
        assert "test/f1_samples" in err or "test/acc" in err
    assert "test/acc" in saved  # the reader is the single-label case


def test_evaluate_reproduces_a_bce_runs_metrics_json(fake_root, bce_run):
    out, _ = bce_run
    assert evaluate.evaluate_checkpoint(out / "checkpoints" / "best.pt") == json.loads(
        (out / "metrics.json").read_text())
    assert evaluate.evaluate_checkpoint(out) == evaluate.evaluate_checkpoint(out / "checkpoints" / "best.pt")


def test_a_random_label_order_scores_the_same_loss_every_time(fake_root, tmp_path):
    write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root, model={"label_order": "random"},
                     task_state={"class_counts": [1] * 10})
    losses = []
    for seed in (1, 2):  # what the process drew before must not matter
        torch.manual_seed(seed)
        losses.append(evaluate.evaluate_checkpoint(tmp_path / "m.pt")["test/loss"])
    assert losses[0] == losses[1]


def test_evaluate_builds_test_composites_of_another_grid(fake_root, tmp_path):
    write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root)
    results = evaluate.evaluate_checkpoint(tmp_path / "m.pt", grid=3, max_items=4)
    assert results["test/grid"] == 3 and results["test/max_items"] == 4 and 0 <= results["test/f1_samples"] <= 1
    write_checkpoint(tmp_path / "bce.pt", "multilabel_bce", fake_root)    # global max pool: any grid as well
    assert evaluate.evaluate_checkpoint(tmp_path / "bce.pt", grid=3)["test/max_items"] == 9
    write_checkpoint(tmp_path / "cnn.pt", "cnn", fake_root)
    with pytest.raises(UserError, match="single-label task=cnn model that reads one item; drop them"):
        evaluate.evaluate_checkpoint(tmp_path / "cnn.pt", grid=3)
    with pytest.raises(UserError, match="--max-items 10 must be between 1 and the 9 cells of a 3x3 grid"):
        evaluate.evaluate_checkpoint(tmp_path / "m.pt", grid=3, max_items=10)


def test_evaluate_refusals_come_before_any_work(fake_root, tmp_path, capsys):
    single = tmp_path / "cnn.pt"
    write_checkpoint(single, "cnn", tmp_path / "no-data-here")  # a refusal must not need the data
    code, _, err = run_main(capsys, evaluate.main, tmp_path / "model.onnx")
    assert code == 2 and "is an exported ONNX model, but evaluate reads checkpoints" in err
    multi = tmp_path / "multi.pt"
    write_checkpoint(multi, "multilabel", fake_root)
    code, out, err = run_main(capsys, evaluate.main, multi, "--grid", "17")
    assert code == 2 and out == "" and err == "error: --grid 17 must be from 1 to 16 (cells per side).\n"
    code, _, err = run_main(capsys, evaluate.main, single, "--data", tmp_path / "typo")
    assert code == 2 and err.strip() == (f"error: --data {tmp_path / 'typo'} does not exist; give a folder of class "
                                         f"folders or a CSV of your pictures.")


def test_a_checkpoint_whose_config_is_a_string_is_one_sentence_naming_it(tmp_path, capsys):
    path = tmp_path / "odd.pt"
    checkpoint.save(path, {"model": {}, "config": "task: cnn", "items": {}})
    code, out, err = run_main(capsys, evaluate.main, path)
    assert code == 2 and out == "" and err.startswith(f"error: {path} holds a 'config' of type str")
    assert len(err.splitlines()) == 1


def test_a_checkpoint_with_nan_weights_is_refused_once(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "nan.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    state = checkpoint.load(ckpt)
    next(v for v in state["model"].values() if v.is_floating_point())[0] = float("nan")
    checkpoint.save(ckpt, state)
    code, out, err = run_main(capsys, evaluate.main, ckpt)
    assert code == 2 and out == "" and "holds NaN or infinite weights" in err and len(err.splitlines()) == 1


@no_cuda
def test_cuda_without_a_gpu_is_one_sentence(tmp_path, capsys):
    code, _, err = run_main(capsys, evaluate.main, tmp_path / "never-read.pt", "--device", "cuda")
    assert code == 2 and err.strip() == "error: --device cuda, but no CUDA device is available here; use --device cpu."


@no_cuda
def test_a_run_trained_on_cuda_is_evaluated_on_the_cpu_with_a_warning(caplog):
    cfg = preset("cnn", trainer={"device": "cuda"})
    assert evaluate.run_device(None, cfg) == torch.device("cpu")
    assert "the run used cuda, which is not available here" in caplog.text
    assert evaluate.run_device("cpu", cfg) == torch.device("cpu")


@pytest.mark.slow
def test_evaluate_reproduces_a_run_of_the_default_sizes_under_bf16(fake_root, tmp_path):
    """The decoder's default sizes under bf16, where tiny models would hide a mismatch in rounding."""
    cfg = tiny(fake_root, "multilabel", model=preset("multilabel").model, trainer={"amp": True},
               reader={"cache": str(tmp_path / "readers")})
    metrics = stages.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    same_numbers(evaluate.evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt"), saved)
