"""The typed config: presets as differences from the defaults, validation in one sentence, the known keys."""
from __future__ import annotations

import dataclasses

import pytest

from cnnrnn.config import (
    MAX_SEED,
    MODEL_OF,
    PRESETS,
    Config,
    check_key,
    from_dict,
    known_keys,
    preset,
    preset_dict,
)
from cnnrnn.data.composite import MAX_GRID
from cnnrnn.errors import UserError


def test_every_preset_is_a_valid_config_of_its_task():
    assert set(PRESETS) == {"lstm", "lstm2", "cnn", "reader", "multilabel", "multilabel_bce"}
    for task in PRESETS:
        cfg = preset(task)
        assert cfg.task == task and from_dict(cfg.to_dict()) == cfg


def test_a_preset_holds_only_its_differences_from_the_defaults():
    assert preset("multilabel") == Config()
    cnn = preset("cnn")
    assert MODEL_OF["cnn"] == "cnn" and cnn.trainer.epochs == 40 and not cnn.eval.tta
    assert dataclasses.replace(cnn.trainer, epochs=Config().trainer.epochs) == Config().trainer
    assert preset_dict("lstm")["model"] == {"hidden": 186, "layers": 1, "dropout": 0.2}


def test_changes_to_a_preset_keep_its_other_keys():
    cfg = preset("cnn", trainer={"epochs": 2}, data={"val_size": 100}, seed=3)
    assert cfg.trainer.epochs == 2 and cfg.trainer.batch_size == preset("cnn").trainer.batch_size
    assert cfg.data.val_size == 100 and cfg.seed == 3 and cfg.model == preset("cnn").model
    assert preset("reader", model={"hidden": 16}).model["convs"] == 2


def test_an_unknown_task_is_refused_with_the_closest_one():
    with pytest.raises(UserError, match="Unknown task 'cnnn' \\(did you mean 'cnn'\\?\\); choose one of lstm"):
        preset("cnnn")
    with pytest.raises(UserError, match="Unknown task 'foo'"):
        from_dict({"task": "foo"})


def test_from_dict_fills_in_defaults_and_coerces_numbers():
    cfg = from_dict({"task": "cnn", "model": preset_dict("cnn")["model"], "trainer": {"epochs": 2.0},
                     "optim": {"lr": 1}})
    assert cfg.trainer.epochs == 2 and isinstance(cfg.trainer.epochs, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.data == Config().data
    assert from_dict({"data": {"grid": (2, 3), "max_items": 9}}).data.grid == [2, 3]


def test_a_partial_model_group_is_completed_with_its_models_defaults():
    cfg = from_dict({"task": "multilabel", "model": {"hidden": 32}})
    assert cfg.model == {**preset_dict("multilabel")["model"], "hidden": 32}


@pytest.mark.parametrize("values, words", [
    ([], "A config must be a mapping of keys, not list."),
    ({"trainer": {"epoch": 3}}, "Unknown config key 'trainer.epoch' (did you mean 'epochs'?)"),
    ({"traner": {}}, "Unknown config key 'traner' (did you mean 'trainer'?)"),
    ({"trainer": 3}, "trainer is a group of keys, not a value; set trainer.KEY=VALUE instead."),
    ({"model": "cnn"}, "model is a group of keys, not a value"),
    ({"trainer": {"epochs": "abc"}}, "trainer.epochs='abc' must be of type int"),
    ({"trainer": {"epochs": 2.5}}, "trainer.epochs=2.5 must be of type int"),
    ({"trainer": {"amp": "maybe"}}, "trainer.amp='maybe' must be of type bool"),
    ({"trainer": {"epochs": True}}, "trainer.epochs=True must be of type int"),
    ({"optim": {"lr": float("inf")}}, "optim.lr=inf must be a finite number"),
    ({"optim": {"lr": float("nan")}}, "optim.lr=nan must be a finite number"),
    ({"optim": {"warmup_epochs": float("-inf")}}, "optim.warmup_epochs=-inf must be a finite number"),
])
def test_from_dict_refuses_what_is_not_a_config(values, words):
    with pytest.raises(UserError) as refused:
        from_dict(values)
    assert words in str(refused.value)


@pytest.mark.parametrize("task, groups, words", [
    ("cnn", {"seed": -1}, f"seed=-1 must be between 0 and {MAX_SEED}"),
    ("cnn", {"seed": 2 ** 40}, "seed=1099511627776 must be between 0 and"),
    ("cnn", {"data": {"seed": 2 ** 32}}, "data.seed=4294967296 must be between 0 and"),
    ("cnn", {"trainer": {"epochs": -1}}, "trainer.epochs=-1 must be from 1 to 10,000"),
    ("cnn", {"trainer": {"batch_size": 0}}, "trainer.batch_size=0 must be from 1 to 65,536"),
    ("cnn", {"trainer": {"device": "tpu"}}, "trainer.device='tpu' must be auto, cpu or cuda"),
    ("cnn", {"trainer": {"ema": 1.0}}, "trainer.ema=1.0 must be a decay in (0, 1) or null"),
    ("cnn", {"trainer": {"log_every": 0}}, "trainer.log_every=0 must be a number of steps, at least 1"),
    ("cnn", {"trainer": {"ckpt_every": -1}}, "trainer.ckpt_every=-1 must be 0 (off)"),
    ("cnn", {"optim": {"lr": 0}}, "optim.lr=0.0 must be greater than 0"),
    ("cnn", {"optim": {"lr": -0.1}}, "must be greater than 0"),
    ("cnn", {"optim": {"name": "sgd", "momentum": 0}}, "optim.momentum=0.0 must be in (0, 1)"),
    ("cnn", {"optim": {"momentum": 1.5}}, "optim.momentum=1.5 must be in (0, 1)"),
    ("cnn", {"optim": {"name": "adam"}}, "optim.name='adam' must be adamw or sgd"),
    ("cnn", {"optim": {"warmup_epochs": 41}}, "optim.warmup_epochs=41.0 must be between 0 and trainer.epochs"),
    ("cnn", {"optim": {"label_smoothing": 1}}, "optim.label_smoothing=1.0 must be in [0, 1)"),
    ("multilabel", {"optim": {"reader_lr": 2}}, "optim.reader_lr=2.0 must be a share of optim.lr in [0, 1]"),
    ("cnn", {"data": {"val_size": 0}}, "data.val_size=0 must be a count (at least 1)"),
    ("cnn", {"data": {"shift": 9}}, "data.shift=9 must be between 0 and 8 pixels"),
    ("multilabel", {"data": {"min_items": 3, "max_items": 2}}, "data.min_items=3 is larger than data.max_items=2"),
    ("multilabel", {"data": {"max_items": 5}}, "more items than the 2x2 grid has cells"),
    ("multilabel", {"data": {"grid": [2, 3], "min_items": 5, "max_items": 9}}, "more items than the 2x2 grid"),
    ("multilabel", {"data": {"grid": MAX_GRID + 1}}, f"data.grid=17 must be a grid size from 1 to {MAX_GRID}"),
    ("multilabel", {"data": {"grid": [2, 17]}}, "data.grid=[2, 17] must be a grid size from 1 to 16"),
    ("multilabel", {"data": {"grid": []}}, "data.grid=[] must be a grid size"),
    ("multilabel", {"data": {"eval_grid": 17}}, "data.eval_grid=17 must be from 1 to 16"),
    ("multilabel", {"data": {"repeats": 1.5}}, "data.repeats=1.5 must be a probability in [0, 1]"),
    ("multilabel", {"data": {"degrade": 2}}, "data.degrade=2.0 must be a strength in [0, 1]"),
    ("multilabel", {"data": {"test_size": 0}}, "data.test_size=0 must be from 1 to 10,000,000"),
    ("multilabel", {"data": {"test_size": 10 ** 9}}, "data.test_size=1000000000 must be from 1 to 10,000,000"),
    ("cnn", {"trainer": {"epochs": 10 ** 6}}, "trainer.epochs=1000000 must be from 1 to 10,000"),
    ("multilabel", {"reader": {"epochs": 0}}, "reader.epochs=0 must be from 1 to 10,000, or null"),
    ("multilabel", {"model": {"beam_size": 0}}, "model.beam_size=0 must be at least 1"),
    ("multilabel", {"model": {"label_order": "alphabetical"}}, "model.label_order='alphabetical' must be one of"),
    ("multilabel", {"model": {"cell": 7}}, "Unknown config key 'model.cell'; this task's model takes channels,"),
    ("cnn", {"model": {"beam_size": 2}}, "Unknown config key 'model.beam_size'; this task's model takes channels,"),
    ("cnn", {"model": {"name": "cnn_rnn"}}, "model.name is no setting: each task trains its own model"),
])
def test_invalid_values_are_refused_in_one_sentence_naming_the_key(task, groups, words):
    with pytest.raises(UserError) as refused:
        preset(task, **groups)
    message = str(refused.value)
    assert words in message and message.endswith(".") and "\n" not in message  # one sentence


def test_removed_keys_are_unknown():
    for key in ("model.cell", "model.embed_dropout", "model.pool", "optim.schedule",
                "oracle.ckpt", "oracle.epochs"):
        assert key not in known_keys("multilabel"), key
        with pytest.raises(UserError, match=f"Unknown config key '{key}'"):
            check_key(key, "multilabel")


def test_known_keys_are_the_tasks_own_model_keys_and_every_group():
    cnn, decoder = known_keys("cnn"), known_keys("multilabel")
    assert {"trainer.epochs", "data.shift", "eval.tta", "seed"} <= cnn
    assert not {"data.grid", "reader.cache", "optim.reader_lr", "model.beam_size"} & cnn
    assert "model.convs" in cnn and {"data.grid", "reader.cache", "optim.reader_lr"} <= decoder
    assert {"model.beam_size", "model.label_order", "model.init_from", "model.target"} <= decoder
    check_key("model.beam_size", "multilabel")                  # known: no error
    with pytest.raises(UserError, match=r"Unknown config key 'model.hiden' \(did you mean 'model.hidden'\?\); "
                                        r"`python -m cnnrnn.train task=cnn --cfg job` lists every key."):
        check_key("model.hiden", "cnn")
    with pytest.raises(UserError, match="Unknown config key 'model.beam_size'; `python -m cnnrnn.train task=cnn"):
        check_key("model.beam_size", "cnn")
    with pytest.raises(UserError, match="data.grid is a setting of the composite tasks .* task=cnn reads single "
                                        "items, so drop it."):
        check_key("data.grid", "cnn")
    assert "grid" not in preset("cnn").to_dict()["data"] and "reader" not in preset("lstm").to_dict()


def test_grids_and_the_test_grid():
    cfg = preset("multilabel", data={"grid": [2, 3], "max_items": 9})
    assert cfg.data.grids == (2, 3) and cfg.data.test_grid == 3
    assert preset("multilabel", data={"eval_grid": 4}).data.test_grid == 4 and Config().data.grids == (2,)
