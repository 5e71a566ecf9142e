"""stages: the per-item reader a composite run needs, a cached run of its own, trained once and reused, the tile
oracle; its folder named by a digest of its recipe and items."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import run_main, tiny, tiny_args, write_dataset

from cnnrnn import build, checkpoint, stages, tasks, train
from cnnrnn.config import preset
from cnnrnn.data import fashion_mnist
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.errors import UserError
from cnnrnn.training import score_oracle


def test_a_composite_run_trains_its_reader_once_and_a_second_run_reuses_it(fake_root, tmp_path):
    cache = tmp_path / "readers"
    cfg = tiny(fake_root, "multilabel", trainer={"epochs": 1}, reader={"cache": str(cache)})
    first = stages.run(cfg, tmp_path / "a")
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    best = folder / "checkpoints" / "best.pt"
    assert json.loads((folder / "metrics.json").read_text())["epochs"] == 1       # reader.epochs
    assert checkpoint.load(best)["config"]["task"] == "reader" and (folder / "train.log").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    _, needed = stages.prepare(cfg, tmp_path / "b")
    assert needed[0].done and "trained already, reused" in needed[0].describe()
    second = stages.run(cfg, tmp_path / "b")
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps  # not trained again
    assert first["oracle/ckpt"] == second["oracle/ckpt"] == str(best)
    assert first["oracle/f1_samples"] == second["oracle/f1_samples"]
    splits = fashion_mnist.splits(fake_root, cfg.data.val_size)
    test = tasks.make_task(cfg, FORMAT).sources(cfg, splits).test
    assert isinstance(test, CompositeSource)
    oracle = score_oracle(build.reader_model(best), test, torch.device("cpu"), FORMAT)
    assert oracle["oracle/f1_samples"] == first["oracle/f1_samples"]
    # optim.reader_lr=0 (the default): the reader is frozen, so the trained model holds the reader as it was
    reader = checkpoint.load(best)["model"]
    for name in ("model", "train_model"):
        weights = checkpoint.load(tmp_path / "a" / "checkpoints" / "best.pt")[name]
        assert {k[len("reader."):]: v for k, v in weights.items() if k.startswith("reader.")}.keys() == reader.keys()
        assert all(torch.equal(weights[f"reader.{k}"], v) for k, v in reader.items()), name


def test_without_the_reader_stage_there_is_no_oracle_and_the_whole_model_trains(fake_root, tmp_path):
    cfg = tiny(fake_root, "multilabel", trainer={"epochs": 1}, reader={"train": False, "cache": str(tmp_path / "r")})
    assert stages.prepare(cfg, tmp_path / "run") == (cfg, [])
    torch.manual_seed(cfg.seed)
    initial = build.model(cfg, FORMAT).state_dict()  # the run builds its model right after seeding the same way
    metrics = stages.run(cfg, tmp_path / "run")
    assert not any(k.startswith("oracle/") for k in metrics) and not (tmp_path / "r").exists()
    trained = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")["train_model"]
    assert not all(torch.equal(initial[k], trained[k]) for k in initial if k.startswith("reader."))


def test_the_reader_stage_takes_the_runs_reader_shape_and_items(tmp_path):
    cfg = tiny(tmp_path / "data", "multilabel", data={"limit": 300, "degrade": 0.1, "shift": 2},
               reader={"epochs": 3, "cache": str(tmp_path / "readers")}, trainer={"device": "cpu"})
    run_cfg, (stage,) = stages.prepare(cfg, tmp_path / "run")
    reader = stage.cfg
    assert reader.task == "reader" and reader.trainer.epochs == 3 and reader.trainer.device == "cpu"
    assert reader.model["channels"] == [4, 8] and reader.model["convs"] == 2 and reader.model["hidden"] == 16
    assert (reader.data.limit, reader.data.degrade, reader.data.root) == (300, 0.1, cfg.data.root)
    assert reader.data.shift == 2 and reader.trainer.batch_size == 256  # the reader's own recipe otherwise
    assert stage.folder == tmp_path / "readers" / f"reader-{stages.recipe_digest(reader)}"
    assert run_cfg.model["init_from"] == str(stage.folder / "checkpoints" / "best.pt")
    default = tiny(tmp_path / "data", "multilabel", reader={"epochs": None})
    assert stages.reader_config(default).trainer.epochs == preset("reader").trainer.epochs
    in_run = tiny(tmp_path / "data", "multilabel", reader={"cache": None})
    assert stages.prepare(in_run, tmp_path / "run")[1][0].folder == tmp_path / "run" / "reader"
    given = tiny(tmp_path / "data", "multilabel", model={"init_from": "mine.pt"})
    assert stages.prepare(given, tmp_path / "run") == (given, [])
    assert stages.prepare(tiny(tmp_path / "data", "cnn"), tmp_path / "run")[1] == []


def test_the_recipe_digest_ignores_where_and_how_fast_a_model_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "data")
    write_dataset(tmp_path / "other")
    base = stages.reader_config(tiny(Path("data"), "multilabel"))
    same = [stages.reader_config(tiny(tmp_path / "data", "multilabel", trainer={"device": "cpu", "threads": 1,
                                                                                  "progress": True})),
            stages.reader_config(tiny(Path("./data/"), "multilabel"))]
    assert all(stages.recipe_digest(c) == stages.recipe_digest(base) for c in same)
    other = [stages.reader_config(tiny(Path("data"), "multilabel", reader={"epochs": 2})),
             stages.reader_config(tiny(Path("data"), "multilabel", seed=1)),
             stages.reader_config(tiny(Path("other"), "multilabel")),
             stages.reader_config(tiny(Path("data"), "multilabel", data={"degrade": 0.3}))]
    assert len({stages.recipe_digest(c) for c in [base, *other]}) == 5


def test_clones_that_read_the_same_files_share_their_reader(tmp_path, monkeypatch):
    """data.root is the default `data` of each clone; both fall back to the system package."""
    write_dataset(tmp_path / "system")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "system")
    clones = [stages.reader_config(tiny(tmp_path / name / "data", "multilabel")) for name in ("a", "b")]
    assert stages.recipe_digest(clones[0]) == stages.recipe_digest(clones[1])


def send_at(monkeypatch, step: int, signum: int) -> None:
    """SIGTERM (or `signum`) to this process during training step `step` of a single-label model: the reader."""
    real_loss, calls = tasks.Classification.loss, []

    def loss(self, model, batch):
        if model.training:
            calls.append(1)
            if len(calls) == step:
                os.kill(os.getpid(), signum)
        return real_loss(self, model, batch)

    monkeypatch.setattr(tasks.Classification, "loss", loss)


def test_a_stage_inside_the_run_stopped_midway_is_kept_and_continued_by_resume(fake_root, in_process, capsys,
                                                                              monkeypatch):
    run = in_process / "run"
    args = tiny_args(fake_root, "task=multilabel", "trainer.epochs=1", "reader.cache=null", "reader.epochs=2",
                     f"hydra.run.dir={run}")
    with monkeypatch.context() as patch:
        send_at(patch, 2, signal.SIGTERM)                         # the reader's second epoch (one step each)
        code, _, err = run_main(capsys, train.main, *args)
    assert code == 128 + signal.SIGTERM and f"continue with resume={run}" in err
    assert (run / ".reader.partial" / "checkpoints" / "last.pt").is_file() and not (run / "reader").exists()
    code, _, err = run_main(capsys, train.main, f"resume={run}")
    assert code == 0, err
    assert "Resuming" in (run / "reader" / "train.log").read_text() and (run / "metrics.json").is_file()
    assert json.loads((run / "reader" / "metrics.json").read_text())["epochs"] == 2


def test_a_damaged_cached_reader_is_named_as_the_cache_entry_with_the_fix(fake_root, tmp_path):
    cfg = tiny(fake_root, "multilabel", reader={"cache": str(tmp_path / "readers")})
    _, (stage,) = stages.prepare(cfg, tmp_path / "run")
    (stage.folder / "checkpoints").mkdir(parents=True)
    (stage.folder / "checkpoints" / "best.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match=rf"The cached reader in {stage.folder} cannot be used \(.*\); delete that "
                                        r"folder and the next run trains it again."):
        stages.check(cfg)
    checkpoint.save(stage.folder / "checkpoints" / "best.pt", {"config": preset("multilabel").to_dict(), "items": FORMAT.to_dict(),
                                                              "model": {}})
    with pytest.raises(UserError, match="The cached reader in .* cannot be used"):
        stages.check(cfg)
    (tmp_path / "file").write_text("a file")
    with pytest.raises(UserError, match="is a file, not a folder"):
        stages.check(tiny(fake_root, "multilabel", reader={"cache": str(tmp_path / "file" / "readers")}))
