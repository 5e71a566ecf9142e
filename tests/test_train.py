"""python -m cnnrnn.train: run folders, resume, the bad-input walk, stop signals, kill -9 resume, sweeps."""
from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    PYTHON,
    ROOT,
    cli,
    cli_env,
    entry_point_state,
    files_in,
    idx_bytes,
    needs_real_data,
    one_error,
    run_commands,
    run_main,
    scalars,
    tags,
    tiny,
    tiny_args,
    train_once,
    write_dataset,
)
from PIL import Image

from cnnrnn import build, checkpoint, rundir, train, training
from cnnrnn.config import preset
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.errors import UserError


def tree(folder: Path) -> list[str]:
    """Every file and folder below `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def cli_run(fake_dataset, tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny composite run through the command line, in this process: (run dir, its overrides)."""
    def command_line(cfg, out: Path) -> list[str]:
        args = tiny_args(Path(cfg.data.root), "task=multilabel", "trainer.epochs=1", f"hydra.run.dir={out}")
        with entry_point_state(out.parent):
            train.main(args)
        return args

    return train_once(fake_dataset, tmp_path_factory, "cli", lambda root: tiny(root, "multilabel"), command_line)


def test_a_run_from_the_command_line_keeps_its_config_overrides_and_log(cli_run):
    out, args = cli_run
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert saved["task"] == "multilabel" and saved["trainer"]["epochs"] == 1
    reader = Path(saved["model"]["init_from"])                  # the reader stage's checkpoint, as the run used it
    assert reader.is_file() and reader.parts[-3].startswith("reader-")
    assert checkpoint.load(out / "checkpoints" / "last.pt")["config"] == saved
    assert yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text()) == args
    log = (out / "train.log").read_text()
    assert "stage 1/2: the per-item reader (task=reader, 1 epochs)" in log and "stage 2/2: task=multilabel" in log
    assert "task=multilabel params=" in log and f"wrote {out / 'metrics.json'}" in log
    assert (out / "metrics.json").is_file() and "oracle/f1_samples" in json.loads((out / "metrics.json").read_text())
    assert {"val/f1_samples", "test/f1_samples"} <= set(tags(out)["scalars"])


def test_resuming_a_finished_run_changes_nothing(cli_run, in_process, capsys):
    out, _ = cli_run
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, stdout, err = run_main(capsys, train.main, f"resume={out}")
    assert code == 0 and "is finished (results in" in err and "nothing to do" in err and stdout == ""
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamp


def test_a_changed_override_on_a_finished_run_is_refused(cli_run, in_process, capsys):
    out, _ = cli_run
    code, _, err = run_main(capsys, train.main, f"resume={out}", "trainer.epochs=30")
    assert code == 2
    assert (f"resume={out} is a finished run (results in {out / 'metrics.json'}), so trainer.epochs=30 "
            f"(its 1) would change nothing; drop trainer.epochs, or start a new run with it.") in one_error(err)


def stopped_run(folder: Path, **state) -> Path:
    """A run folder whose last.pt says it stopped after epoch 1 of task=cnn: no training needed."""
    cfg = preset("cnn", trainer={"epochs": 2})
    loop = dataclasses.asdict(training.TrainState(epoch=1, global_step=10))
    checkpoint.save(folder / "checkpoints" / "last.pt", {
        "model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "config": cfg.to_dict(), **state,
        "state": state.get("state", loop)})
    return folder


def test_a_resumed_run_continues_as_it_was_configured(tmp_path, in_process, capsys):
    out = stopped_run(tmp_path / "run")
    code, _, err = run_main(capsys, train.main, f"resume={out}", "trainer.epochs=5")
    assert code == 2 and (f"resume={out} continues that run as it was configured, but trainer.epochs=5 differs "
                          f"from its 2; drop trainer.epochs, or start a new run with it.") in one_error(err)


def test_a_resumed_run_is_locked(tmp_path, in_process, capsys):
    out = stopped_run(tmp_path / "run")
    held = rundir.lock_existing(out)  # as if another process were continuing it
    try:
        code, _, err = run_main(capsys, train.main, f"resume={out}")
    finally:
        held.release()
    assert code == 2 and "is being written by another process right now" in one_error(err)


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "nowhere", "is not a folder; give the run dir to continue"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has neither checkpoints/last.pt nor .hydra/config.yaml"),
    (lambda d: "", "resume= is not a folder; give the run dir to continue"),
    (lambda d: stopped_run(d / "old", state={"epoch": 1, "global_step": 10}), "holds a loop state of another version"),
    (lambda d: stopped_run(d / "cfg", config="task: cnn"), "holds a 'config' of type str"),
    (lambda d: stopped_run(d / "opt", optimizer=None), "holds a 'optimizer' of type NoneType"),
])
def test_what_cannot_be_resumed_is_one_sentence(tmp_path, in_process, capsys, make, words):
    code, _, err = run_main(capsys, train.main, f"resume={make(tmp_path)}")
    assert code == 2 and words in one_error(err)


def test_a_run_killed_before_its_first_checkpoint_starts_again_with_resume(fake_root, in_process, capsys):
    run = in_process / "run"
    args = tiny_args(fake_root, "task=cnn", "trainer.epochs=1", f"hydra.run.dir={run}")
    code, _, err = run_main(capsys, train.main, *args)
    assert code == 0, err
    for made in [*run.glob("checkpoints"), *run.glob("figures"), run / "metrics.json", run / "curves.png"]:
        shutil.rmtree(made) if made.is_dir() else made.unlink()  # what a SIGKILL in epoch 1 leaves: .hydra, a log
    code, _, err = run_main(capsys, train.main, *args)
    assert code == 2 and f"continue that run with resume={run}" in one_error(err)
    code, _, err = run_main(capsys, train.main, f"resume={run}")
    assert code == 0, err
    # the run's event files (its own and add_hparams's), not the killed try's too
    assert (run / "metrics.json").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 2
    code, _, err = run_main(capsys, train.main, f"resume={run}", f"hydra.run.dir={in_process / 'elsewhere'}")
    assert code == 2 and "drop hydra.run.dir" in one_error(err)


def test_sweep_job_folders_are_checked_as_hydra_resolves_them_before_any_job_starts(tmp_path, in_process, capsys):
    mine = in_process / "mine"
    mine.mkdir()
    (mine / "curves.png").write_text("a user's figure")
    for subdir, words in (("${hydra:runtime.cwd}/mine", "outside the sweep folder"),
                          ("${oc.env:HOME}", "outside the sweep folder"),
                          ("same", "jobs 0 and 1 of this sweep would share the folder")):
        code, _, err = run_main(capsys, train.main, "-m", "task=cnn", "seed=1,2", f"hydra.sweep.dir={tmp_path}/s",
                                f"hydra.sweep.subdir={subdir}")
        assert code == 2 and words in one_error(err)
    assert files_in(mine) == {"curves.png": b"a user's figure"} and not (tmp_path / "s").exists()


def test_a_job_outside_or_in_a_taken_folder_writes_nothing_there(tmp_path, capsys):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    (tmp_path / "sweep" / "0" / "train.log").write_text("another job's log\n")
    for folder, words in ((tmp_path / "out", "outside the sweep folder"),
                          (tmp_path / "sweep" / "0", "already belongs to another job")):
        folder.mkdir(exist_ok=True)
        before = files_in(folder)
        with pytest.raises(SystemExit) as exit_info:
            train.job(preset("cnn"), folder, None, tmp_path / "sweep", 0, [], total=3)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and "job 0 and the 2 after it did not run" in err
        assert files_in(folder) == before


def test_print_the_config_only_of_a_command_line_the_project_accepts(tmp_path, in_process, capsys):
    code, out, err = run_main(capsys, train.main, "--cfg", "job", "trainer.epochs=abc")
    assert code == 2 and out == "" and one_error(err) == (
        "error: trainer.epochs='abc' must be of type int; write it as in `python -m cnnrnn.train --cfg job`.")


def test_paths_too_long_or_with_a_newline_are_refused_on_one_line(tmp_path, in_process, capsys):
    code, _, err = run_main(capsys, train.main, f"hydra.run.dir={tmp_path}/{'x' * 300}/run")
    assert code == 2 and "is too long a path for this file system; choose a shorter name." in one_error(err)
    code, _, err = run_main(capsys, train.main, "task=cnn", "data.root='a\nb'", f"hydra.run.dir={tmp_path}/r",
                            "trainer.epochs=abc")
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_refused_command_lines_create_nothing(tmp_path, in_process, capsys):
    for argv, words in ((["task=cnn,lstm"], "gives several values, which makes a sweep; add -m"),
                        (["-m", "seed=1,2", f"resume={tmp_path}"], "resume continues one run; drop -m."),
                        (["-m", "seed=1,2", "hydra.sweep.subdir=../x"], "outside the sweep folder"),
                        (["hydra.output_subdir=../x"], "hydra.output_subdir cannot be set here"),
                        (["task=cnn", "model.beam_size=2"], "Unknown config key 'model.beam_size'"),
                        (["data.grid=17"], "data.grid=17 must be a grid size from 1 to 16")):
        code, out, err = run_main(capsys, train.main, *argv)
        assert code == 2 and out == "" and words in one_error(err), argv
    assert list(in_process.iterdir()) == []  # not even runs/


def test_sigterm_while_the_command_line_is_checked_exits_143_and_creates_nothing(fake_root, in_process, capsys,
                                                                                 monkeypatch):
    def preflight(cfg):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(build, "preflight", preflight)
    code, _, err = run_main(capsys, train.main, *tiny_args(fake_root, "task=cnn", "hydra.run.dir=run"))
    assert code == 143 and err == "error: Stopped by SIGTERM before the run started; nothing was created.\n"
    assert list(in_process.iterdir()) == []


def test_sigterm_before_the_first_checkpoint_removes_the_run_folder(fake_root, in_process, capsys, monkeypatch):
    real_setup = training.setup

    def setup(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_setup(*args, **kwargs)

    monkeypatch.setattr(training, "setup", setup)
    code, _, err = run_main(capsys, train.main, *tiny_args(fake_root, "task=cnn", "hydra.run.dir=new/run"))
    assert code == 143 and "Stopped by SIGTERM before the first checkpoint" in one_error(err)
    assert "the same command starts it again" in err and list(in_process.iterdir()) == []


def test_an_interpolated_run_dir_onto_a_finished_run_is_refused(tmp_path, in_process, capsys):
    (tmp_path / "cnn" / "checkpoints").mkdir(parents=True)
    (tmp_path / "cnn" / "metrics.json").write_text("{}")
    before = files_in(tmp_path)
    code, _, err = run_main(capsys, train.main, "task=cnn", f"hydra.run.dir={tmp_path}/x/../${{task}}")
    assert code == 2 and f"hydra.run.dir={tmp_path / 'cnn'} already holds a run" in one_error(err)
    assert files_in(tmp_path) == before and not (tmp_path / "x").exists()


def test_nothing_is_overwritten_by_a_refused_run(tmp_path, in_process, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "metrics.json").write_text("{}")
    code, _, err = run_main(capsys, train.main, f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 2 and "already holds a run" in one_error(err)
    assert tree(tmp_path / "run") == ["checkpoints", "metrics.json"]
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


def test_a_sweep_into_an_existing_sweep_is_refused(tmp_path, in_process, capsys):
    (tmp_path / "0-seed=0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "multirun.yaml").write_text("old")
    before = files_in(tmp_path)
    code, _, err = run_main(capsys, train.main, "-m", "task=cnn", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert code == 2 and "already holds a sweep" in one_error(err)
    assert files_in(tmp_path) == before


def test_a_run_refused_late_leaves_nothing_behind(tmp_path, in_process, capsys):
    write_dataset(tmp_path / "data")  # 600 items: refused when the data is read, after the folder was claimed
    (tmp_path / "empty").mkdir()
    # the first command twice: refused the same way again, as nothing is left that blocks it
    for out in (tmp_path / "new" / "deeper", tmp_path / "new" / "deeper", tmp_path / "empty"):
        code, _, err = run_main(capsys, train.main, "task=cnn", f"data.root={tmp_path / 'data'}",
                                f"hydra.run.dir={out}")
        assert code == 2 and "holds 600 items, expected 60000" in one_error(err)
    assert not (tmp_path / "new").exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_sweep_hands_each_job_to_the_training_of_one_job(fake_root, in_process, capsys, monkeypatch):
    handed = []
    monkeypatch.setattr(train.shell, "sweep", lambda argv, job: handed.append((argv, job)))
    code, _, err = run_main(capsys, train.main, "-m", "task=cnn", "seed=1,2", "hydra.sweep.dir=sweep")
    assert code == 0, err
    (argv, job), = handed
    assert f"hydra.sweep.dir={in_process / 'sweep'}" in argv and "hydra.output_subdir=null" in argv
    assert job.func is train.job and job.keywords == {"total": 2}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_cuda_without_a_gpu_is_refused_before_any_folder_exists(fake_root, in_process, capsys):
    code, _, err = run_main(capsys, train.main, *tiny_args(fake_root, "task=multilabel", "reader.cache=readers"),
                            "trainer.device=cuda", "hydra.run.dir=run")
    assert code == 2 and "no CUDA device is available here" in one_error(err)
    assert list(in_process.iterdir()) == []


def test_a_default_folder_taken_in_the_same_second_gets_the_next_name(tmp_path):
    (tmp_path / "runs" / "cnn" / "12-00-00" / ".hydra").mkdir(parents=True)
    claim = train.claim_folder(str(tmp_path / "runs" / "cnn" / "12-00-00"), "hydra.run.dir", {})
    assert claim.path == tmp_path / "runs" / "cnn" / "12-00-00-2"
    claim.release()
    with pytest.raises(UserError, match="already holds a run"):  # a folder the user chose is not renamed
        train.claim_folder(str(tmp_path / "runs" / "cnn" / "12-00-00"), "hydra.run.dir",
                           {"hydra.run.dir": "hydra.run.dir=x"})


# --- the bad-input walk: every refusal of every command, as a user meets it (slow) -------------------------------

def flipped_byte(path: Path, source: Path) -> None:
    raw = bytearray(source.read_bytes())
    raw[raw.index(torch.full((16,), 0.25).numpy().tobytes()) + 8] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Files for the bad-input walk: broken datasets, broken checkpoints, a finished run, images, a report folder."""
    base = tmp_path_factory.mktemp("bad")
    for name in ("truncated", "magic", "counts", "labels"):
        write_dataset(base / name)  # tiny files: right format, wrong counts for the real loader
    with gzip.open(base / "truncated" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((60000, 28, 28), np.uint8))[:5000])
    with gzip.open(base / "magic" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(np.zeros((60000, 28, 28), np.uint8), magic=2049))
    for name, array in (("train-images-idx3-ubyte", np.zeros((60000, 28, 28))), ("t10k-images-idx3-ubyte",
                        np.zeros((10000, 28, 28))), ("train-labels-idx1-ubyte", np.full(60000, 12))):
        with gzip.open(base / "labels" / f"{name}.gz", "wb", compresslevel=1) as f:
            f.write(idx_bytes(array.astype(np.uint8)))
    ckpt = base / "ckpt"
    ckpt.mkdir()
    (ckpt / "empty.pt").write_bytes(b"")
    (ckpt / "text.pt").write_text("not a checkpoint")
    cnn = preset("cnn")
    checkpoint.save(ckpt / "full.pt", {"model": build.model(cnn, FORMAT).state_dict(), "config": cnn.to_dict(), "items": FORMAT.to_dict()})
    (ckpt / "truncated.pt").write_bytes((ckpt / "full.pt").read_bytes()[: (ckpt / "full.pt").stat().st_size // 2])
    checkpoint.save(ckpt / "alien.pt", {"model": build.model(cnn, FORMAT).state_dict(),   # an lstm config, cnn weights
                                        "config": preset("lstm").to_dict(), "items": FORMAT.to_dict()})
    checkpoint.save(ckpt / "string.pt", {"model": build.model(cnn, FORMAT).state_dict(), "config": "task: cnn"})
    checkpoint.save(ckpt / "quarter.pt", {"model": {"w": torch.full((4096,), 0.25)}, "config": cnn.to_dict(), "items": FORMAT.to_dict()})
    flipped_byte(ckpt / "damaged.pt", ckpt / "quarter.pt")
    multi = preset("multilabel", model={"channels": [4, 8], "cell_dim": 16, "hidden": 16, "embed": 8,
                                        "attn_dim": 8})
    checkpoint.save(ckpt / "multi.pt", {"model": build.model(multi, FORMAT).state_dict(), "config": multi.to_dict(), "items": FORMAT.to_dict()})
    torch.save({"weights": torch.zeros(3)}, ckpt / "plain.pt")
    reader = preset("reader", model={"channels": [4, 8], "hidden": 16}, data={"val_size": 4000})
    checkpoint.save(ckpt / "split.pt", {"model": build.model(reader, FORMAT).state_dict(), "config": reader.to_dict(), "items": FORMAT.to_dict()})
    weights = {k: v.long() if v.is_floating_point() else v for k, v in build.model(cnn, FORMAT).state_dict().items()}
    checkpoint.save(ckpt / "int.pt", {"model": weights, "config": cnn.to_dict(), "items": FORMAT.to_dict()})
    (base / "stopped" / ".hydra").mkdir(parents=True)
    (base / "run" / "checkpoints").mkdir(parents=True)
    (base / "run" / "metrics.json").write_text("{}")
    (base / "images").mkdir()
    (base / "images" / "notes.png").write_text("hello")
    Image.fromarray(np.zeros((17 * 28, 17 * 28), np.uint8)).save(base / "big.png")   # 17 x 17 cells
    (base / "mine" / "job").mkdir(parents=True)
    (base / "mine" / "job" / "metrics.json").write_text('{"test/acc": 0.9}')
    (base / "mine" / "table.md").write_text("my own notes")
    (base / "empty").mkdir()
    return base


BAD = [  # (command, the words the one sentence must hold); values checked by unit tests appear once, as examples
    (["cnnrnn.train", "task=foo"], "Unknown task 'foo'"),
    (["cnnrnn.train", "trainer.epoch=3"], "did you mean 'trainer.epochs'"),
    (["cnnrnn.train", "trainer.epochs=abc"], "trainer.epochs='abc' must be of type int"),
    (["cnnrnn.train", "--cfg", "job", "trainer.epochs=abc"], "trainer.epochs='abc' must be of type int"),
    (["cnnrnn.train", "data.root=dätä"], "quote a value that holds spaces, accents or other characters"),
    (["cnnrnn.train", "data.test_size=10000000000"], "data.test_size=10000000000 must be from 1 to 10,000,000"),
    (["cnnrnn.train", "task=cnn", "reader.epochs=3"], "reader.epochs is a setting of the composite tasks"),
    (["cnnrnn.train", "task=cnn", "model.beam_size=2"], "Unknown config key 'model.beam_size'"),
    (["cnnrnn.train", "task=cnn,lstm"], "gives several values, which makes a sweep; add -m"),
    (["cnnrnn.train", "hydra.output_subdir=../x"], "hydra.output_subdir cannot be set here"),
    (["cnnrnn.train", "-m", "seed=1,2", "resume={bad}/run"], "resume continues one run; drop -m"),
    (["cnnrnn.train", "-m", "task=cnn", "seed=1,2", "hydra.sweep.dir={bad}/sw",
      "hydra.sweep.subdir=${{hydra:runtime.cwd}}"], "outside the sweep folder"),
    (["cnnrnn.train", "-m", "task=cnn", "seed=1,2", "hydra.sweep.dir={bad}/sw", "hydra.sweep.subdir=one"],
     "jobs 0 and 1 of this sweep would share the folder"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/truncated",
      "hydra.run.dir={bad}/runs-truncated"], "train-images-idx3-ubyte.gz is truncated"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/magic",
      "hydra.run.dir={bad}/runs-magic"], "magic number 2049, expected 2051"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/counts",
      "hydra.run.dir={bad}/runs-counts"], "holds 600 items, expected 60000"),
    (["cnnrnn.train", "task=cnn", "data.root={bad}/labels",
      "hydra.run.dir={bad}/runs-labels"], "label 12, outside 0..9"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/run"], "already holds a run"),
    (["cnnrnn.train", "resume="], "resume= is not a folder"),
    (["cnnrnn.train", "resume={bad}/empty"], "has neither checkpoints/last.pt nor .hydra/config.yaml"),
    (["cnnrnn.train", "resume={bad}/run", "hydra.run.dir={bad}/elsewhere"], "drop hydra.run.dir"),
    (["cnnrnn.evaluate", "{bad}/ckpt/missing.pt"], "does not exist"),
    (["cnnrnn.evaluate", "{bad}/ckpt/damaged.pt"], "damaged.pt is damaged"),
    (["cnnrnn.evaluate", "{bad}/ckpt/int.pt"], "as torch.int64, where the model keeps torch.float32"),
    (["cnnrnn.evaluate", "{bad}/ckpt/multi.pt", "--grid", "17"], "--grid 17 must be from 1 to 16"),
    (["cnnrnn.evaluate", "{bad}/ckpt/full.pt", "--grid", "3"], "--grid and --max-items are for composites"),
    (["cnnrnn.predict", "{bad}/ckpt/alien.pt", "{bad}/images"], "do not fit a lstm model"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "{bad}/images/notes.png"], "is not a readable image"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "{bad}/empty"], "holds no picture files"),
    (["cnnrnn.predict", "{bad}/ckpt/multi.pt", "{bad}/big.png", "--threshold", "0.5"], "--threshold sets the BCE"),
    (["cnnrnn.predict", "{bad}/ckpt/multi.pt", "{bad}/big.png", "--max-items", "0"], "--max-items 0 must be at"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "{bad}/big.png", "--max-items", "2"], "--max-items caps the label"),
    (["cnnrnn.predict", "{bad}/m.onnx", "{bad}/big.png", "--max-items", "2"], "--max-items needs a checkpoint"),
    # run dirs, caches and early checks
    (["cnnrnn.train", "task=cnn", "data.root={bad}/run", "hydra.run.dir=${{data.root}}"], "already holds a run"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/empty/../run"], "already holds a run"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/images"], "is a folder of other files (notes.png)"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/ckpt/text.pt"], "is a file, not a folder"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir=/proc/cnnrnn/run"], "Cannot create the run folder /proc/cnnrnn/run"),
    (["cnnrnn.train", "task=cnn", f"hydra.run.dir={{bad}}/{'x' * 300}"], "is too long a path for this file system"),
    (["cnnrnn.train", "task=cnn", "hydra.run.dir={bad}/${{nope}}"], "Cannot resolve hydra.run.dir"),
    (["cnnrnn.train", "-m", "task=cnn", "seed=1,2", "hydra.sweep.dir={bad}/images"], "hydra.sweep.dir="),
    (["cnnrnn.train", "task=multilabel", "reader.cache={bad}/ckpt/text.pt/readers"], "is a file, not a folder"),
    (["cnnrnn.train", "task=cnn", "model.channels=[8,8,8,8,8,8]"], "make a model that torch rejects"),
    (["cnnrnn.train", "task=multilabel", "model.init_from={bad}/ckpt/missing.pt"], "does not exist"),
    (["cnnrnn.train", "task=multilabel_bce", "model.init_from={bad}/ckpt/alien.pt"], "do not fit a lstm model"),
    (["cnnrnn.train", "task=multilabel", "model.init_from={bad}/ckpt/multi.pt"], "but a reader is a single-label"),
    (["cnnrnn.train", "task=multilabel", "model.init_from={bad}/ckpt/split.pt"], "another split of the items"),
    (["cnnrnn.train", "data.scene=outfitt"], "data.scene=outfitt: no scene file"),
    *([(["cnnrnn.train", "task=cnn", "trainer.device=cuda", "trainer.amp=false", "hydra.run.dir={bad}/runs-cuda"],
        "no CUDA device is available")] if not torch.cuda.is_available() else []),
    # inference
    (["cnnrnn.evaluate", "{bad}/ckpt/full.pt", "--data", "{bad}/images"], "holds no class folders of pictures"),
    (["cnnrnn.evaluate", "{bad}/exported.onnx"], "evaluate reads checkpoints"),
    (["cnnrnn.predict", "{bad}/ckpt/full.pt", "/dev/null"], "/dev/null is not a regular file"),
    (["cnnrnn.export", "{bad}/ckpt/full.pt", "{bad}/images/notes.png/m.onnx"], "is a file, not a folder"),
    (["cnnrnn.export", "{bad}/ckpt/full.pt", "{bad}/m.txt"], "does not end in .onnx"),
    (["cnnrnn.export", "{bad}/ckpt/full.pt", "{bad}/m.onnx", "--opset", "99"], "--opset 99 is outside"),
    (["cnnrnn.compare", "{bad}/run", "--out", "{bad}/images/notes.png/out"], "is a file, not a folder"),
    (["cnnrnn.compare", "{bad}/mine"], "holds a table.md that compare did not write"),
    (["cnnrnn.compare", "{bad}/mine/job", "--out", "{bad}/stopped"], "is a run dir or a cache of readers"),
    (["cnnrnn.bench", "--seconds", "0"], "--seconds 0 must be more than 0"),
    (["cnnrnn.bench", "--batch-sizes", "32,-4"], "each must be between 1 and"),
    (["cnnrnn.bench", "--json", "{bad}/missing/bench.json"], "does not exist; create it first"),
    (["cnnrnn.demo", "{bad}/images"], "is a folder of other files (notes.png)"),
    *([] if torch.cuda.is_available() else [
        (["cnnrnn.evaluate", "{bad}/ckpt/full.pt", "--device", "cuda"], "no CUDA device is available"),
        (["cnnrnn.bench", "--device", "cuda"], "no CUDA device is available")]),
]


@pytest.fixture(scope="module")
def refusals(bad_inputs, tmp_path_factory) -> tuple[list[subprocess.CompletedProcess], list[str], Path]:
    """Every BAD command run as a user would, in an empty folder; with what the bad inputs' folder held before."""
    before = tree(bad_inputs)
    cwd = tmp_path_factory.mktemp("cwd")
    procs = run_commands([[a.format(bad=bad_inputs) for a in args] for args, _ in BAD],
                         tmp_path_factory.mktemp("walk"), cwd=cwd)
    return procs, before, cwd


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a)[7:47] for a, _ in BAD])
def test_bad_input_gets_one_clear_sentence(refusals, case):
    proc, words = refusals[0][case], BAD[case][1]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and words in errors[0], proc.stderr
    assert errors[0].rstrip().endswith((".", ")")), "one sentence"


@pytest.mark.slow
def test_the_refused_commands_created_nothing(refusals, bad_inputs):
    _, before, cwd = refusals
    assert tree(bad_inputs) == before and list(cwd.iterdir()) == []


# --- the command as a user runs it, on the real data (slow) ------------------------------------------------------

@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize("task", ["lstm", "cnn"])
def test_command_line_on_real_data(tmp_path, task):
    """One epoch on 3000 items leaves metrics.json, last.pt, the log, the config and the tags."""
    out = tmp_path / task
    proc = cli("cnnrnn.train", f"task={task}", "trainer.epochs=1", "data.limit=3000", "trainer.progress=false",
               f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.json").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert (out / "train.log").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert {"train/loss", "val/acc", "val/loss", "test/acc"} <= set(tags(out)["scalars"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.3 and metrics["params"] == {"lstm": 162_574, "cnn": 421_738}[task]
    assert checkpoint.load(out / "checkpoints" / "last.pt")["config"]["task"] == task


@pytest.mark.slow
def test_hydras_own_answers_print_the_config_and_the_help(tmp_path):
    job = cli("cnnrnn.train", "task=cnn", "trainer.epochs=3", "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    printed = yaml.safe_load(job.stdout)
    assert printed["task"] == "cnn" and printed["trainer"]["epochs"] == 3 and "name" not in printed["model"]
    assert cli("cnnrnn.train", "--help", cwd=tmp_path).returncode == 0 and list(tmp_path.iterdir()) == []


RESUME_ARGS = ["task=cnn", "trainer.epochs=3", "data.limit=1500", "data.val_size=500", "data.train_eval_size=300",
               "trainer.progress=false", "trainer.threads=1", "trainer.ckpt_every=4", "trainer.log_every=2"]
MULTI_ARGS = ["task=multilabel", "model.channels=[8,16]", "model.cell_dim=32", "model.hidden=32", "model.embed=16",
              "model.attn_dim=16", "data.limit=1500", "data.val_size=300", "data.test_size=300",
              "data.train_eval_size=100", "trainer.batch_size=64", "trainer.epochs=2", "trainer.progress=false",
              "trainer.threads=1", "trainer.ckpt_every=4", "trainer.log_every=2", "reader.epochs=1"]
CASES = {"cnn-SIGKILL": (RESUME_ARGS, signal.SIGKILL), "cnn-SIGINT": (RESUME_ARGS, signal.SIGINT),
         "cnn-SIGTERM": (RESUME_ARGS, signal.SIGTERM), "multilabel-SIGTERM": (MULTI_ARGS, signal.SIGTERM)}


def start(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "cnnrnn.train", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("train/ms_per_step", "wall_time_s", "hardware")}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> dict:
    """Runs signalled at their first step checkpoint and resumed, beside uninterrupted ones, all at once."""
    base = tmp_path_factory.mktemp("interrupted")
    readers = f"reader.cache={base / 'readers'}"
    MULTI_ARGS.append(readers)
    references = {"cnn": start(RESUME_ARGS, base / "cnn"), "multilabel": start(MULTI_ARGS, base / "multilabel")}
    runs = {case: (base / case, start(args, base / case)) for case, (args, _) in CASES.items()}
    due, sent, deadline = {}, set(), time.time() + 600
    while len(sent) < len(runs):  # each is signalled on its own clock, from its first checkpoint
        for case, (out, proc) in runs.items():
            if case in sent:
                continue
            assert proc.poll() is None, proc.stderr.read()
            if case not in due and (out / "checkpoints" / "last.pt").exists():
                due[case] = time.time()  # right after step 4's checkpoint: mid-epoch 1
            if case in due and time.time() >= due[case]:
                proc.send_signal(CASES[case][1])
                sent.add(case)
        assert time.time() < deadline, "a run never wrote its first checkpoint"
        time.sleep(0.02)
    stopped = {}
    for case, (out, proc) in runs.items():
        _, err = proc.communicate(timeout=600)
        stopped[case] = proc.returncode, err, (out / "metrics.json").exists()
    resumes = {case: subprocess.Popen([PYTHON, "-m", "cnnrnn.train", f"resume={out}"], cwd=ROOT, env=cli_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for case, (out, _) in runs.items()}
    results = {}
    for name, proc in references.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        results[name] = base / name
    for case, proc in resumes.items():
        _, err = proc.communicate(timeout=900)
        results[case] = (*stopped[case], runs[case][0], proc.returncode, err)
    return results


def same_as_uninterrupted(out: Path, reference: Path) -> None:
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(
        json.loads((reference / "metrics.json").read_text()))
    final, expected = (checkpoint.load(d / "checkpoints" / "last.pt") for d in (out, reference))
    assert final["state"]["global_step"] == expected["state"]["global_step"] and (out / "metrics.json").is_file()
    for name in ("model", "train_model"):
        assert all(torch.equal(final[name][k], v) for k, v in expected[name].items()), name
    assert scalars(out, "train/loss") == scalars(reference, "train/loss")  # each step once, the same values


@pytest.mark.slow
@needs_real_data
def test_sigkill_then_resume_gives_the_uninterrupted_run(interrupted):
    _, _, finished_early, out, code, err = interrupted["cnn-SIGKILL"]
    assert not finished_early
    assert code == 0, err
    same_as_uninterrupted(out, interrupted["cnn"])
    assert [s for s, _ in scalars(out, "val/acc")] == [11, 22, 33]
    again = cli("cnnrnn.train", f"resume={out}")
    assert again.returncode == 0 and "is finished" in again.stderr


@pytest.mark.slow
@needs_real_data
@pytest.mark.parametrize("case", [
    "cnn-SIGINT", "cnn-SIGTERM",
    "multilabel-SIGTERM"])
def test_a_signal_mid_epoch_saves_says_so_and_resumes_exactly(interrupted, case):
    returncode, err, _, out, code, resume_err = interrupted[case]
    signum = CASES[case][1]
    assert returncode == 128 + signum, err
    assert "Traceback" not in err
    said = [line for line in err.splitlines() if "Stopped by" in line]
    assert len(said) == 1 and signal.Signals(signum).name in said[0] and f"resume={out}" in said[0]
    assert re.search(r"at epoch \d+, step \d+", said[0])
    assert code == 0, resume_err
    same_as_uninterrupted(out, interrupted[case.split("-")[0]])


@pytest.mark.slow
@needs_real_data
def test_two_runs_started_at_once_into_one_folder(tmp_path):
    out = tmp_path / "run"
    args = ["task=cnn", "trainer.epochs=1", "data.limit=600", "data.val_size=100", "data.train_eval_size=100",
            "trainer.batch_size=100", "trainer.progress=false", "trainer.threads=1"]
    procs = [start(args, out), start(args, out)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(err for code, err in results if code == 2)
    assert "is being written by another run" in one_error(err) or "already holds a run" in one_error(err)
    log = (out / "train.log").read_text()
    assert log.count("task=cnn params=") == 1 and "ERROR" not in log  # one run wrote it all
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # the run's own two (epochs, then hparams)
    assert (out / "metrics.json").is_file() and sorted(p.name for p in (out / ".hydra").iterdir()) == [
        "config.yaml", "overrides.yaml"]


@pytest.mark.slow
@needs_real_data
def test_a_joblib_sweep_runs_its_jobs_side_by_side_on_a_share_of_the_cores_each(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("cnnrnn.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=lstm", "seed=0,1",
               "trainer.epochs=1", "data.limit=600", "data.val_size=500", "data.train_eval_size=100",
               "trainer.progress=false", f"hydra.sweep.dir={sweep}", timeout=900)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))  # each job its own folder, named by its overrides
    assert [j.name[:2] for j in jobs] == ["0-", "1-"]
    assert "seed=0" in jobs[0].name and "seed=1" in jobs[1].name and "task=lstm" in jobs[0].name
    from cnnrnn.ranks import cores
    share = max(1, cores() // 2)
    for job in jobs:
        log = (job / "train.log").read_text()
        assert re.search(rf"\b{share} threads: this machine's {cores()} cores shared by 2 processes", log), log
        assert json.loads((job / "metrics.json").read_text())["hardware"].endswith(f", {share} threads")
