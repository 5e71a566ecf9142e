"""training.fit: the run folder, seeds, exact resume, NaN losses, frozen readers (the stages before: test_stages)."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from conftest import scalars, tags, tiny, train_once

from cnnrnn import checkpoint, stages, tasks, training
from cnnrnn.config import from_dict, preset
from cnnrnn.data import fashion_mnist
from cnnrnn.data.composite import CellFeatures, CompositeSource
from cnnrnn.errors import UserError
from cnnrnn.metrics import best_threshold
from cnnrnn.ranks import StopSignals, gather_rng

F1_TAGS = {"val/f1_micro", "val/f1_macro", "val/f1_samples", "val/exact_match", "val/hamming_loss",
           "test/f1_micro", "test/f1_samples", "test/exact_match"}
VARIES = ("train/ms_per_step", "wall_time_s", "hardware")  # how fast, not what


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in VARIES}


@pytest.fixture(scope="module")
def lstm_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    return train_once(fake_dataset, tmp_path_factory, "lstm", lambda root: tiny(root, "lstm", data={"augment": True}))


@pytest.fixture(params=["cnn", "lstm"])
def single_run(request) -> tuple[Path, dict]:
    return request.getfixturevalue(f"{request.param}_run")


def test_a_run_writes_the_whole_run_directory(single_run):
    out, metrics = single_run
    for name in ("metrics.json", "curves.png", "checkpoints/last.pt", "checkpoints/best.pt",
                 "figures/test_confusion_matrix.png", "figures/test_misclassified.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("test/acc", "test/loss", "val/acc_best", "params", "train/ms_per_step", "wall_time_s", "best_epoch",
                "epochs", "hardware", "test/acc/T-shirt-top", "test/acc/Ankle_boot"):
        assert key in saved, key
    assert 0.0 <= saved["test/acc"] <= 1.0 and saved["params"] > 0 and saved["epochs"] == 2
    found = tags(out)
    for tag in ("train/loss", "train/acc", "val/acc", "val/loss", "lr", "perf/ms_per_step", "perf/samples_per_s",
                "test/acc", "test/loss"):
        assert tag in found["scalars"], tag
    assert {"test/confusion_matrix", "test/misclassified"} <= set(found["images"])
    steps = [s for s, _ in scalars(out, "train/loss")]
    assert steps == list(range(1, 21))                      # one point per step: 2 epochs of 500 // 50
    assert [s for s, _ in scalars(out, "val/acc")] == [10, 20]
    last, best = checkpoint.load(out / "checkpoints" / "last.pt"), checkpoint.load(out / "checkpoints" / "best.pt")
    assert last["state"]["global_step"] == 20 and len(last["state"]["history"]) == 2
    assert best["state"]["epoch"] == saved["best_epoch"] and best["summary"]["params"] == saved["params"]


def test_the_fake_data_is_learnt(cnn_run):
    """The loop really trains: the bar position is trivially learnable by the cnn."""
    assert cnn_run[1]["test/acc"] > 0.9


def test_same_seed_same_metrics_and_another_seed_others(fake_root, lstm_run, tmp_path):
    cfg = tiny(fake_root, "lstm", data={"augment": True})
    a, b = lstm_run[1], stages.run(cfg, tmp_path / "b")
    keys = [k for k in a if k.startswith(("test/", "val/"))]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    c = stages.run(tiny(fake_root, "lstm", data={"augment": True}, seed=1), tmp_path / "c")
    assert a["test/loss"] != c["test/loss"]


def nan_at(monkeypatch, step: int | None) -> None:
    """Make the training loss of the cnn NaN at training step `step` (every step when None)."""
    real_loss = tasks.Classification.loss
    calls = []

    def loss(self, model, batch):
        value, stats = real_loss(self, model, batch)
        calls.extend([1] if model.training else [])
        return (value * float("nan") if step is None or len(calls) == step else value), stats

    monkeypatch.setattr(tasks.Classification, "loss", loss)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fake_root, tmp_path, monkeypatch):
    nan_at(monkeypatch, 13)  # step 3 of epoch 2
    with pytest.raises(UserError, match=r"became nan at step 13 \(epoch 2\); stopped, and .*last.pt still holds the "
                                        r"last good state; lower optim.lr or set optim.grad_clip"):
        stages.run(tiny(fake_root, "cnn", data={"train_eval_size": 0}), tmp_path / "run")
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["state"]["epoch"] == 1 and last["state"]["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_a_nan_before_any_checkpoint_names_none(fake_root, tmp_path, monkeypatch):
    nan_at(monkeypatch, None)
    with pytest.raises(UserError, match=r"became nan at step 1 \(epoch 1\); stopped, and no checkpoint was written"):
        stages.run(tiny(fake_root, "cnn"), tmp_path / "run")


def test_the_pieces_of_a_run_set_up_train_validate_and_save(fake_root, tmp_path, caplog, monkeypatch):
    cfg = tiny(fake_root, "cnn", trainer={"log_every": 3, "ckpt_every": 4})
    run = training.setup(cfg, tmp_path / "run")
    try:
        assert run.proc.rank == 0 and run.proc.world == 1 and run.steps_per_epoch == 10
        assert run.eval_model is run.ema.module and run.state == training.TrainState()
        assert run.ckpt_dir == tmp_path / "run" / "checkpoints"
        with StopSignals() as stop:
            record = training.train_epoch(run, stop)
            assert run.state.global_step == 10 and record["epoch"] == 1
            assert {"lr", "perf/ms_per_step", "perf/samples_per_s"} <= set(record)
            # the last step checkpoint of the epoch was due at step 8, a sync although 8 is not a multiple of 3
            assert checkpoint.load(run.ckpt_dir / "last.pt")["state"]["global_step"] == 8
            assert int(run.ema.n_averaged) == 10                        # the EMA follows every step
            assert not all(torch.equal(a, b) for a, b in zip(run.model.parameters(), run.ema.module.parameters()))
            with caplog.at_level(logging.INFO, "cnnrnn"), monkeypatch.context() as m:
                m.setattr(training.time, "time", lambda: 1000.0)  # a clock that stands still: no timing in the test
                training.validate(run, record, started=(940.0, 0))
            assert "val/acc" in record and "train/acc" in record and "train/epoch_loss" in record
            # one epoch of two took a minute: the other will take as long
            assert re.search(r"^epoch 1/2 .* ms/step, 60 s left$", caplog.records[-1].getMessage())
            training.end_epoch(run, record, stop)
        assert run.state.epoch == 1 and run.state.best_epoch == 1 and len(run.state.history) == 1
        assert checkpoint.load(run.ckpt_dir / "best.pt")["state"]["epoch"] == 1
        training.save(run, tmp_path / "x.pt", gather_rng(1), note="here")
        saved = checkpoint.load(tmp_path / "x.pt")
        assert saved["note"] == "here" and saved["state"]["global_step"] == 10
        assert saved["config"]["trainer"]["log_every"] == 3 and saved["items"] == fashion_mnist.FORMAT.to_dict()
        assert {"model", "train_model", "ema_n", "optimizer", "scheduler", "rng", "state", "task_state",
                "params", "scene"} <= set(saved)
    finally:
        run.writer.close()


@pytest.fixture(scope="module")
def cnn_ckpt_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """The session's cnn run again with losses synced every 3 steps and a checkpoint every 4."""
    return train_once(fake_dataset, tmp_path_factory, "cnn-ckpt", lambda root: tiny(
        root, "cnn", optim={"lr": 1e-2}, trainer={"log_every": 3, "ckpt_every": 4}))


def test_a_window_that_does_not_divide_the_epoch_logs_every_step_and_changes_nothing(cnn_run, cnn_ckpt_run):
    (a, metrics_a), (b, metrics_b) = cnn_run, cnn_ckpt_run
    assert scalars(a, "train/loss") == scalars(b, "train/loss")
    assert [s for s, _ in scalars(b, "train/loss")] == list(range(1, 21))
    keys = [k for k in metrics_a if k.startswith(("test/", "val/"))]
    assert {k: metrics_a[k] for k in keys} == {k: metrics_b[k] for k in keys}


@pytest.fixture(scope="module")
def multilabel_ckpt_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    return train_once(fake_dataset, tmp_path_factory, "multilabel-ckpt", lambda root: tiny(
        root, "multilabel", trainer={"log_every": 3, "ckpt_every": 4}))


def send_at(monkeypatch, task_cls, step: int, signum: int) -> None:
    """Send `signum` to this process during training step `step`, as a user would at any moment."""
    real_loss, calls = task_cls.loss, []

    def loss(self, model, batch):
        if model.training:
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signum)
        return real_loss(self, model, batch)

    monkeypatch.setattr(task_cls, "loss", loss)


@pytest.mark.parametrize("task, signum, step", [
    ("cnn", signal.SIGTERM, 13),
    pytest.param("cnn", signal.SIGINT, 5, marks=pytest.mark.slow),
    pytest.param("multilabel", signal.SIGTERM, 13, marks=pytest.mark.slow),
    pytest.param("multilabel", signal.SIGINT, 5, marks=pytest.mark.slow),
])
def test_a_run_stopped_mid_epoch_with_step_checkpoints_resumes_exactly(request, fake_root, tmp_path, monkeypatch,
                                                                      caplog, task, signum, step):
    """Signalled mid-epoch with ckpt_every set: exit 128+signal, then a resume equal to the uninterrupted run."""
    reference_dir, reference = request.getfixturevalue(f"{task}_ckpt_run")
    cfg = from_dict(checkpoint.load(reference_dir / "checkpoints" / "last.pt")["config"])
    out = tmp_path / "run"
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, "cnnrnn"), \
            pytest.raises(SystemExit) as stopped:
        send_at(patch, tasks.Classification if task == "cnn" else tasks.LabelSequence, step, signum)
        stages.run(cfg, out)
    assert stopped.value.code == 128 + signum
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Stopped by")]
    assert len(said) == 1 and signal.Signals(signum).name in said[0] and f"resume={out}" in said[0]
    saved = checkpoint.load(out / "checkpoints" / "last.pt")
    assert saved["state"]["global_step"] == (step + 2) // 3 * 3  # the next sync
    assert not (out / "metrics.json").exists()
    resumed = stages.run(from_dict(saved["config"]), out, saved)
    assert comparable(resumed) == comparable(reference)
    final, expected = (checkpoint.load(d / "checkpoints" / "last.pt") for d in (out, reference_dir))
    assert final["state"]["global_step"] == expected["state"]["global_step"] == 20 and (out / "metrics.json").is_file()
    for name in ("model", "train_model"):
        assert all(torch.equal(final[name][k], v) for k, v in expected[name].items()), name
    assert scalars(out, "train/loss") == scalars(reference_dir, "train/loss")  # every step once, the same losses


def test_a_resumed_run_caches_the_features_of_its_trained_reader(fake_root, multilabel_run, tmp_path):
    saved = checkpoint.load(multilabel_run[0] / "checkpoints" / "last.pt")
    run = training.setup(from_dict(saved["config"]), tmp_path / "b", saved)
    try:
        assert isinstance(run.sources.val, CellFeatures)
        expected = training.cell_features(run.model.reader, run.sources.val.source.split.images, run.task, run.proc)
        assert torch.equal(run.sources.val.feats, expected[0])
    finally:
        run.writer.close()


def test_sigterm_in_the_final_evaluation_says_how_to_finish(fake_root, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    cfg = tiny(fake_root, "cnn", trainer={"epochs": 1})
    real_evaluate = training.evaluate

    def interrupted(run, source, desc):
        if desc == "test":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(run, source, desc)

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, "cnnrnn"), \
            pytest.raises(SystemExit) as exit_:
        patch.setattr(training, "evaluate", interrupted)
        stages.run(cfg, out)
    assert exit_.value.code == 128 + signal.SIGTERM
    said = [r.getMessage() for r in caplog.records if "during the final test evaluation" in r.getMessage()]
    assert len(said) == 1 and f"resume={out}" in said[0] and "the training is complete" in said[0]
    assert not (out / "metrics.json").exists()
    saved = checkpoint.load(out / "checkpoints" / "last.pt")
    metrics = stages.run(from_dict(saved["config"]), out, saved)
    assert (out / "metrics.json").is_file() and 0 <= metrics["test/acc"] <= 1 and metrics["epochs"] == 1


def test_a_multilabel_run_reports_set_metrics_the_tile_oracle_and_its_figures(multilabel_run):
    out, metrics = multilabel_run
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test/f1_micro", "test/f1_macro", "test/f1_samples", "test/exact_match", "test/hamming_loss",
                "test/cf1", "test/map", "test/cardinality_acc", "test/f1/Bag", "params", "oracle/f1_samples",
                "oracle/exact_match", "oracle/ckpt"):
        assert key in saved, key
    assert saved["test/f1_samples"] == pytest.approx(metrics["test/f1_samples"])
    found = tags(out)
    assert F1_TAGS <= set(found["scalars"])
    assert {"test/composites", "test/f1_per_class", "test/attention"} <= set(found["images"])


def test_the_bce_threshold_is_the_micro_f1_optimum_of_the_saved_model_on_validation(fake_root, bce_run, tmp_path):
    out, metrics = bce_run
    assert "test/f1_micro_at_0.5" in metrics
    assert any(math.isclose(metrics["threshold"], t) for t in (0.05 * i for i in range(1, 20)))  # the tuning grid
    best = checkpoint.load(out / "checkpoints" / "best.pt")
    run = training.setup(from_dict(best["config"]), tmp_path / "again")  # the run's own validation source
    try:
        run.eval_model.load_state_dict(best["model"])
        _, val_out, val_t = training.evaluate(run, run.sources.val, "validation")
    finally:
        run.writer.close()
    assert metrics["threshold"] == best_threshold(val_t.numpy(), val_out["scores"].numpy())


def frozen_setup(root: Path, out: Path, **groups):
    """The set-up of a composite run whose reader stage has run (trained once a session in its cache)."""
    cfg, needed = stages.prepare(tiny(root, "multilabel", **groups), out)
    for stage in needed:
        stages.train_stage(stage)
    return training.setup(cfg, out)


@pytest.mark.parametrize("data, cached", [({}, True), ({"augment": False}, True), ({"shift": 1}, False),
                                          ({"degrade": 0.2}, False)])
def test_a_frozen_readers_features_are_computed_once_when_items_never_change_but_flips(fake_root, tmp_path, data,
                                                                                      cached):
    run = frozen_setup(fake_root, tmp_path / "run", data=data)
    try:
        assert not run.model.reader.training and not any(p.requires_grad for p in run.model.reader.parameters())
        for source in (run.sources.train, run.sources.train_eval, run.sources.val):
            assert isinstance(source, CellFeatures) == cached
        assert isinstance(run.sources.test, CompositeSource)  # the final model reads the test pictures
    finally:
        run.writer.close()


def test_a_reader_with_a_rate_of_its_own_trains_from_pixels(fake_root, tmp_path):
    run = frozen_setup(fake_root, tmp_path / "run", optim={"reader_lr": 0.5})
    try:
        assert isinstance(run.sources.train, CompositeSource) and run.model.reader.training
        rates = {g["lr"] for g in run.optimizer.param_groups}
        assert rates == {run.cfg.optim.lr, run.cfg.optim.lr * 0.5}
    finally:
        run.writer.close()


def test_which_augmentations_leave_a_frozen_readers_features_fixed():
    data = preset("multilabel").data
    assert training.cacheable(data)                                                  # flips only
    for change in ({"shift": 1}, {"degrade": 0.1}):
        assert not training.cacheable(preset("multilabel", data=change).data), change
    assert training.cacheable(preset("multilabel", data={"augment": False, "shift": 2}).data)


def test_a_multiset_run_on_mixed_grids_reports_counting_metrics(fake_root, tmp_path):
    cfg = tiny(fake_root, "multilabel", trainer={"epochs": 1}, model={"target": "multiset"},
               data={"grid": [2, 3], "max_items": 9, "repeats": 0.5, "epoch_size": 100, "train_eval_size": 0,
                     "test_size": 60})
    assert cfg.data.grids == (2, 3) and cfg.data.test_grid == 3
    result = stages.run(cfg, tmp_path / "run")
    for key in ("test/multiset_exact", "test/count_acc", "test/multiset_f1_micro", "test/count_mae",
                "test/f1_samples", "oracle/f1_samples"):
        assert 0 <= result[key] <= 9, key
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test/count_acc"] == result["test/count_acc"]
