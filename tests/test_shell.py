"""The command line: one composition into a Config, our own key checks, sweeps only with -m, limited hydra keys."""
from __future__ import annotations

import logging
import os

import pytest
from conftest import tiny, tiny_args

from cnnrnn import shell
from cnnrnn.config import preset
from cnnrnn.errors import UserError


def refusal(argv: list[str]) -> str:
    with pytest.raises(UserError) as refused:
        shell.parse(argv)
    return str(refused.value)


def test_a_composed_command_line_is_the_tasks_preset_with_the_changes():
    assert shell.to_config(shell.compose([])) == preset("multilabel")
    assert shell.to_config(shell.compose(["task=cnn"])) == preset("cnn")
    cfg = shell.to_config(shell.compose(["task=lstm", "trainer.epochs=3", "model.hidden=16", "data.shift=1"]))
    assert cfg == preset("lstm", trainer={"epochs": 3}, model={"hidden": 16}, data={"shift": 1})
    cfg = shell.to_config(shell.compose(["data.grid=[2,3]", "data.max_items=9", "reader.cache=null"]))
    assert cfg == preset("multilabel", data={"grid": [2, 3], "max_items": 9}, reader={"cache": None})


@pytest.mark.parametrize("task", ["cnn", "lstm", "multilabel", "multilabel_bce"])
def test_tiny_args_are_tiny_on_the_command_line(tmp_path, task):
    assert shell.to_config(shell.compose(tiny_args(tmp_path, f"task={task}"))) == tiny(tmp_path, task)


def test_an_experiment_and_an_arm_compose():
    cfg = shell.to_config(shell.compose(["+experiment=context", "+arm=bce"]))
    assert cfg.task == "multilabel_bce" and cfg.data.scene == "outfit" and cfg.data.shift == 0
    assert shell.to_config(shell.compose(["+arm=no_feedback"])).model["feedback"] is False


def test_an_unresolvable_value_is_one_sentence():
    with pytest.raises(UserError, match=r"Cannot resolve trainer.epochs \(Interpolation key 'nope'.*; give it a "
                                        r"plain value."):
        shell.to_config(shell.compose(["trainer.epochs=${nope}"]))


def test_unknown_keys_are_refused_with_the_closest_one():
    assert "Unknown config key 'trainer.epoch' (did you mean 'trainer.epochs'?)" in refusal(["trainer.epoch=3"])
    assert "did you mean 'model.hidden'" in refusal(["task=cnn", "model.hiden=3"])


def test_a_key_of_another_model_is_refused_for_the_task_at_hand():
    message = refusal(["task=cnn", "model.beam_size=2"])
    assert message.startswith("Unknown config key 'model.beam_size'") and "task=cnn --cfg job" in message
    shell.parse(["task=multilabel", "model.beam_size=2"])                 # the decoder's own key: fine
    assert "model.beam_size" in refusal(["-m", "task=multilabel,cnn", "model.beam_size=2"])  # every task of a sweep


def test_removed_keys_are_refused():
    for line in ("oracle.ckpt=x.pt", "oracle.epochs=1", "model.cell=7",
                 "model.embed_dropout=0.1", "model.pool=max", "optim.schedule=cosine"):
        assert "Unknown config key" in refusal(["task=multilabel", line]), line


def test_group_choices_are_checked():
    assert "Unknown task 'foo'" in refusal(["task=foo"])
    assert "Unknown experiment 'nope'; choose one of context" in refusal(["+experiment=nope"])
    assert "Unknown arm 'nope'; choose one of bce, decoder, no_feedback" in refusal(["+arm=nope"])
    assert shell.parse(["+experiment=context", "hydra/launcher=joblib"]).jobs == [["+experiment=context",
                                                                                   "hydra/launcher=joblib"]]


def test_several_values_make_a_sweep_only_with_m():
    message = refusal(["task=cnn,lstm"])
    assert message == ("task=cnn,lstm gives several values, which makes a sweep; add -m (python -m cnnrnn.train -m "
                       "task=cnn,lstm), or give one value.")
    command = shell.parse(["-m", "task=cnn,lstm", "seed=1,2", "trainer.epochs=1"])
    assert command.multirun
    assert command.jobs == [["task=cnn", "seed=1", "trainer.epochs=1"], ["task=cnn", "seed=2", "trainer.epochs=1"],
                            ["task=lstm", "seed=1", "trainer.epochs=1"], ["task=lstm", "seed=2", "trainer.epochs=1"]]
    single = shell.parse(["task=cnn"])
    assert not single.multirun and single.jobs == [["task=cnn"]]


def test_only_the_folders_the_launcher_and_verbosity_of_hydra_can_be_set():
    allowed = ["hydra.run.dir=runs/x", "hydra.sweep.dir=s", "hydra.sweep.subdir=${hydra.job.num}",
               "hydra.launcher.n_jobs=2", "hydra/launcher=joblib", "hydra.verbose=true"]
    command = shell.parse(allowed)
    assert set(command.hydra) == {"hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.launcher.n_jobs",
                                  "hydra.verbose"} and command.hydra["hydra.run.dir"] == "hydra.run.dir=runs/x"
    for line in ("hydra.output_subdir=../x", "hydra.job.chdir=true", "hydra.runtime.output_dir=/tmp/x",
                 "hydra.job_logging.root.level=DEBUG"):
        message = refusal(["task=cnn", line])
        assert message.startswith(f"{line.split('=')[0]} cannot be set here") and "hydra.run.dir" in message, line


def test_a_line_that_is_not_key_value_is_one_sentence():
    assert refusal(["trainer.epochs=[1,"]).startswith("Cannot parse the command line (")


def test_a_jobs_folder_is_resolved_as_hydra_resolves_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, folder, params = shell.job_config(["task=cnn", "hydra.run.dir=runs/${task}/x"])
    assert cfg == preset("cnn") and folder == "runs/cnn/x" and params == {}
    _, default, _ = shell.job_config(["task=lstm"])
    assert os.path.dirname(default) == "runs/lstm"                               # runs/TASK/TIME
    _, cwd, _ = shell.job_config(["hydra.run.dir=${hydra:runtime.cwd}/r"])
    assert cwd == f"{tmp_path}/r"
    # a sweep job's folder as the launcher names it: its number and its overrides
    _, sub, _ = shell.job_config(["seed=2", "task=cnn"], "hydra.sweep.subdir", num=3)
    assert sub == "3-seed=2,task=cnn"
    _, _, params = shell.job_config(["+experiment=context"], "hydra.sweep.dir")
    assert params == {"+arm": "decoder,no_feedback,bce", "data.degrade": "0.0,0.5"}
    with pytest.raises(UserError, match=r"Cannot resolve hydra.run.dir \(.*nope"):
        shell.job_config(["hydra.run.dir=${nope}"])
    assert not (tmp_path / "runs").exists()                                       # composing makes no folder


def test_the_log_goes_to_stderr_and_the_runs_train_log(in_process, capsys):
    shell.log_to(in_process)
    logging.getLogger("cnnrnn").info("hello %s", "there")
    assert "hello there" in (in_process / "train.log").read_text() and "hello there" in capsys.readouterr().err
