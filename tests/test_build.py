"""Objects from a config: optimizer groups and schedule, a checkpoint's model and task, the reader, preflight."""
from __future__ import annotations

import math

import pytest
import torch

from cnnrnn import build, checkpoint
from cnnrnn.config import preset
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.errors import UserError
from cnnrnn.models.cnn import SmallCNN
from cnnrnn.tasks import MultiLabelBCE

SMALL = {"channels": [4, 8], "cell_dim": 16}


def save_model(path, cfg, **extra):
    torch.manual_seed(0)
    net = build.model(cfg, FORMAT)
    checkpoint.save(path, {"model": net.state_dict(), "config": cfg.to_dict(), "items": FORMAT.to_dict(), **extra})
    return net


def test_no_weight_decay_on_biases_and_norm_scales():
    cfg = preset("cnn", model={"channels": [4, 8], "hidden": 16})
    net = build.model(cfg, FORMAT)
    opt, _ = build.optimizer(cfg, net, 10)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in net.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1), name
    assert opt.defaults["fused"] and isinstance(opt, torch.optim.AdamW)
    sgd, _ = build.optimizer(preset("cnn", optim={"name": "sgd"}), net, 10)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["fused"]


def test_a_trained_readers_rate_is_a_share_of_the_rate_and_a_frozen_reader_is_not_optimized():
    trained = {**SMALL, "init_from": "reader/checkpoints/best.pt"}
    cfg = preset("multilabel", model=trained, optim={"lr": 1e-3, "reader_lr": 0.1})
    net = build.model(cfg, FORMAT)
    opt, _ = build.optimizer(cfg, net, 10)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        assert rate[id(p)] == pytest.approx(1e-4 if name.startswith("reader.") else 1e-3), name
    scratch = preset("multilabel", model=SMALL, optim={"lr": 1e-3, "reader_lr": 0.1})  # a random reader: full rate
    opt, _ = build.optimizer(scratch, build.model(scratch, FORMAT), 10)
    assert {g["lr"] for g in opt.param_groups} == {1e-3}
    frozen = preset("multilabel", model=trained, optim={"reader_lr": 0.0})
    net = build.model(frozen, FORMAT)
    net.freeze_reader()
    opt, _ = build.optimizer(frozen, net, 10)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in net.named_parameters() if not n.startswith("reader.")}


def test_the_schedule_warms_up_linearly_then_decays_to_zero_along_a_cosine():
    cfg = preset("cnn", trainer={"epochs": 4}, optim={"lr": 1.0, "warmup_epochs": 1.0})
    opt, sched = build.optimizer(cfg, torch.nn.Linear(2, 2), steps_per_epoch=10)
    rates = []
    for _ in range(40):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert rates[10] == pytest.approx(1.0) and rates[25] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:])) and opt.param_groups[0]["lr"] == pytest.approx(0)


def test_a_batch_larger_than_an_epoch_or_uneven_among_processes_is_refused():
    cfg = preset("cnn", trainer={"batch_size": 128})
    build.check_sizes(cfg, 500, world=2)
    with pytest.raises(UserError, match="trainer.batch_size=128 is larger than the 100 training samples"):
        build.check_sizes(cfg, 100)
    with pytest.raises(UserError, match="must divide evenly among 3 processes; make it a multiple of 3"):
        build.check_sizes(cfg, 500, world=3)


def test_a_checkpoint_gives_its_config_its_model_in_eval_mode_and_its_task(tmp_path):
    cfg = preset("multilabel_bce", model=SMALL)
    net = save_model(tmp_path / "m.pt", cfg, task_state={"threshold": 0.37})
    loaded_cfg, model, task = build.from_checkpoint(checkpoint.load(tmp_path / "m.pt"), tmp_path / "m.pt")
    assert loaded_cfg == cfg and not model.training and isinstance(task, MultiLabelBCE) and task.threshold == 0.37
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), net.state_dict().values()))


def test_a_checkpoint_whose_config_is_a_string_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "m.pt"
    checkpoint.save(path, {"model": {}, "config": "task: cnn"})
    with pytest.raises(UserError) as refused:
        build.from_checkpoint(checkpoint.load(path), path)
    assert str(refused.value).startswith(f"{path} holds a 'config' of type str") and "\n" not in str(refused.value)


def test_a_config_this_version_refuses_and_weights_of_another_model_are_one_sentence(tmp_path):
    cnn = preset("cnn")
    state = {"model": build.model(cnn, FORMAT).state_dict(), "config": {**cnn.to_dict(), "oracle": {"ckpt": None}},
             "items": FORMAT.to_dict()}
    with pytest.raises(UserError, match="carries a config or format this version refuses \\(Unknown config key 'oracle'"):
        build.from_checkpoint(state, tmp_path / "old.pt")
    alien = {"model": build.model(cnn, FORMAT).state_dict(), "config": preset("lstm").to_dict(), "items": FORMAT.to_dict()}  # lstm config, cnn weights
    with pytest.raises(UserError, match="holds weights that do not fit a lstm model of task=lstm"):
        build.from_checkpoint(alien, tmp_path / "alien.pt")


def test_nan_weights_are_refused_once(tmp_path):
    cfg = preset("cnn", model={"channels": [4, 8], "hidden": 16})
    weights = build.model(cfg, FORMAT).state_dict()
    next(v for v in weights.values() if v.is_floating_point())[0] = float("nan")
    with pytest.raises(UserError, match="holds NaN or infinite weights .*use an earlier checkpoint"):
        build.from_checkpoint({"model": weights, "config": cfg.to_dict(), "items": FORMAT.to_dict()}, tmp_path / "nan.pt")


def test_the_reader_loads_exactly_into_a_composite_model(tmp_path):
    reader_cfg = preset("reader", model={"channels": [4, 8], "hidden": 16})
    reader = save_model(tmp_path / "reader.pt", reader_cfg)
    assert isinstance(build.reader_model(tmp_path / "reader.pt"), SmallCNN)
    for task in ("multilabel", "multilabel_bce"):
        net = build.model(preset(task, model=SMALL), FORMAT)
        before = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("reader.")}
        build.init_encoder(net, build.reader_model(tmp_path / "reader.pt"), tmp_path / "reader.pt")
        assert all(torch.equal(a, b) for a, b in zip(net.reader.state_dict().values(), reader.state_dict().values()))
        assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # the rest as initialised


def test_a_reader_of_another_shape_or_a_multi_label_checkpoint_is_refused(tmp_path):
    save_model(tmp_path / "small.pt", preset("cnn", model={"channels": [4, 8], "hidden": 16}))  # one conv a stage
    with pytest.raises(UserError, match="is a reader of another shape than this model's; train it with the same "
                                        "model.channels, model.convs"):
        build.init_encoder(build.model(preset("multilabel", model=SMALL), FORMAT), build.reader_model(tmp_path / "small.pt"),
                           tmp_path / "small.pt")
    save_model(tmp_path / "multi.pt", preset("multilabel", model=SMALL))
    with pytest.raises(UserError, match="model.init_from=.*multi.pt holds a task=multilabel model, but a reader is a "
                                        "single-label cnn"):
        build.reader_model(tmp_path / "multi.pt")


def test_model_settings_torch_rejects_and_missing_files_are_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="make a model that torch rejects"):
        build.preflight(preset("cnn", model={"channels": [8, 8, 8, 8, 8, 8]}))
    mixed = preset("multilabel", data={"grid": [3, 2], "max_items": 9})
    build.probe(mixed, build.make_task(mixed, FORMAT))  # the probe once compared an int with the list data.grid
    with pytest.raises(UserError, match="missing.pt does not exist"):
        build.preflight(preset("multilabel", model={"init_from": str(tmp_path / "missing.pt")}))
    with pytest.raises(UserError, match="data.scene=nope: no scene file"):
        build.preflight(preset("multilabel", data={"scene": "nope"}))


def test_a_reader_of_another_split_and_integer_weights_are_refused(tmp_path):
    reader_cfg = preset("reader", model={"channels": [4, 8], "hidden": 16}, data={"val_size": 4000})
    save_model(tmp_path / "reader.pt", reader_cfg)
    run = preset("multilabel", model={**SMALL, "init_from": str(tmp_path / "reader.pt")})
    with pytest.raises(UserError, match=r"was trained on another split of the items \(data.val_size=4000, "
                                        r"data.seed=0; this run: None, 0\), so some of its training items"):
        build.preflight(run)
    cnn = preset("cnn", model={"channels": [4, 8], "hidden": 16})
    weights = {k: v.long() if v.is_floating_point() else v for k, v in build.model(cnn, FORMAT).state_dict().items()}
    checkpoint.save(tmp_path / "int.pt", {"model": weights, "config": cnn.to_dict(), "items": FORMAT.to_dict()})
    with pytest.raises(UserError, match=r"int.pt holds encoder.layers.0.weight as torch.int64, where the model keeps "
                                        r"torch.float32; the file was altered or made elsewhere."):
        build.from_checkpoint(checkpoint.load(tmp_path / "int.pt"), tmp_path / "int.pt")
