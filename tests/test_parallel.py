"""Parallel runs without thrashing: processes started side by side (torchrun's ranks, a joblib sweep's jobs)
each take their share of the cores, not every core."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from cnnrnn import cli
from conftest import PYTHON, ROOT, cli_env, needs_real_data


def hydra_cfg(*overrides: str):
    """Hydra's own node as a job of `python -m cnnrnn.train OVERRIDES` sees it."""
    return cli.compose(list(overrides), with_hydra=True).hydra


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(cli, "cores", lambda: 8)


def test_torchrun_ranks_share_the_cores(eight_cores, monkeypatch):
    assert cli.default_threads(hydra_cfg()) is None  # alone: torch's default, every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.processes_sharing_cores(hydra_cfg()) == 2
    assert cli.default_threads(hydra_cfg()) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than cores: still one thread each
    assert cli.default_threads(hydra_cfg()) == 1


def test_joblib_sweep_jobs_share_the_cores(eight_cores):
    sweep = ("hydra/launcher=joblib", "hydra.mode=MULTIRUN")
    assert cli.default_threads(hydra_cfg(*sweep, "hydra.launcher.n_jobs=2")) == 4
    assert cli.default_threads(hydra_cfg(*sweep, "hydra.launcher.n_jobs=-1")) == 1  # one job per core
    assert cli.processes_sharing_cores(hydra_cfg(*sweep, "hydra.launcher.n_jobs=-1")) == 8
    assert cli.default_threads(hydra_cfg(*sweep, "hydra.launcher.n_jobs=1")) is None
    # n_jobs of a single run (no -m) or of the basic launcher (no n_jobs: one job at a time) changes nothing
    assert cli.default_threads(hydra_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")) is None
    assert cli.default_threads(hydra_cfg("hydra.mode=MULTIRUN")) is None


def test_an_explicit_trainer_threads_wins(eight_cores, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cli.job_threads(cli.compose_config(["trainer.threads=3"]), hydra_cfg()) is None  # run() sets 3
    assert cli.job_threads(cli.compose_config([]), hydra_cfg()) == 4


@needs_real_data
def test_a_joblib_sweep_runs_its_jobs_side_by_side_on_a_share_of_the_cores_each(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [PYTHON, "-m", "cnnrnn.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=lstm",
           "seed=0,1", "trainer.epochs=1", "data.limit=600", "data.val_size=500", "data.train_eval_size=100",
           "trainer.progress=false", f"hydra.sweep.dir={sweep}"]
    env = cli_env()
    env.pop("LOCAL_WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))  # each job its own folder, named by its overrides
    assert [j.name[:2] for j in jobs] == ["0-", "1-"]
    assert "seed=0" in jobs[0].name and "seed=1" in jobs[1].name and "task=lstm" in jobs[0].name
    share = max(1, cli.cores() // 2)
    for job in jobs:
        log = (job / "train.log").read_text()
        assert re.search(rf"\b{share} threads: this machine's {cli.cores()} cores shared by 2 processes", log), log
        assert json.loads((job / "metrics.json").read_text())["hardware"].endswith(f", {share} threads")
