"""The training loop without a sync per step (engine.train_one_epoch) and the pieces of train.run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnrnn import engine, train
from cnnrnn.cli import compose_config
from cnnrnn.engine import NonFiniteLoss, load_checkpoint, train_one_epoch
from cnnrnn.errors import UserError
from conftest import tiny

CPU = torch.device("cpu")


class Tiny:
    """A two-class task on random points; the loss of step `nan_at` (1-based calls) is made NaN."""

    def __init__(self, nan_at: int | None = None):
        self.calls, self.nan_at = 0, nan_at

    def loss(self, model, batch):
        self.calls += 1
        logits = model(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        if self.calls == self.nan_at:
            loss = loss * float("nan")
        return loss, {"acc": (logits.argmax(1) == batch["y"]).float().mean()}


def data(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 3, generator=g), "y": torch.randint(0, 2, (4,), generator=g)} for _ in range(n)]


def setup(optim: str = "adamw"):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    if optim == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    elif optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
    else:  # a for-loop Adam: no on-device guard, a host check per step
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def fit(batches, optim="adamw", nan_at=None, **kwargs):
    model, opt, sched = setup(optim)
    syncs = []
    on_sync = kwargs.pop("on_sync", lambda step, losses, stats, n: syncs.append((step, losses, stats, n)) and False)
    try:
        result = train_one_epoch(model, Tiny(nan_at), opt, sched, batches, device=CPU, on_sync=on_sync, **kwargs)
    except NonFiniteLoss as exc:
        return model, opt, syncs, exc
    return model, opt, syncs, result


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_losses_reach_the_host_every_n_steps_and_at_forced_steps():
    _, _, syncs, result = fit(data(8), log_every=3, first_step=10, sync_at=lambda s: s == 17)
    assert [(s, len(losses), n) for s, losses, _, n in syncs] == [(12, 2, 8), (15, 3, 12), (17, 2, 8), (18, 1, 4)]
    assert set(syncs[0][2]) == {"acc"} and 0 <= syncs[0][2]["acc"] <= 1  # the window's mean stats
    assert result["steps"] == 8 and result["step"] == 18 and not result["stopped"]


def test_the_window_changes_nothing_but_when_python_sees_the_losses():
    model_1, _, syncs_1, result_1 = fit(data(8), log_every=1)
    model_5, _, syncs_5, result_5 = fit(data(8), log_every=5)
    assert [x for _, losses, _, _ in syncs_1 for x in losses] == [x for _, losses, _, _ in syncs_5 for x in losses]
    assert result_1["loss"] == result_5["loss"]
    assert all(torch.equal(a, b) for a, b in zip(weights(model_1), weights(model_5)))


def test_the_host_reads_tensors_only_at_syncs(monkeypatch):
    """What makes a GPU wait (item, tolist, float/int/bool of a tensor) happens at the syncs only: 12 steps with
    log_every=4 read the losses and the mean stat 3 times each."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name)
                            or _real(self, *a))
    _, _, syncs, _ = fit(data(12), log_every=4)
    assert len(syncs) == 3 and sorted(reads) == ["item"] * 3 + ["tolist"] * 3


def test_on_sync_can_stop_at_a_sync():
    _, _, _, result = fit(data(8), log_every=2, on_sync=lambda step, *_: step == 4)
    assert result["stopped"] and result["steps"] == 4 and result["step"] == 4


@pytest.mark.parametrize("optim", ["adamw", "sgd", "plain"])
@pytest.mark.parametrize("log_every", [1, 4])
def test_a_nan_loss_never_reaches_the_weights(optim, log_every):
    """NaN at step 3: the error names step 3 and the weights (and Adam's step count) are those after step 2,
    even though steps 3 and 4 ran before the host saw the losses."""
    before, before_opt, _, _ = fit(data(2), optim)
    model, opt, syncs, exc = fit(data(8), optim, nan_at=3, log_every=log_every)
    assert isinstance(exc, NonFiniteLoss) and exc.step == 3 and exc.value != exc.value
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(before)))
    steps = [s.get("step") for s in opt.state.values()]
    assert steps == [s.get("step") for s in before_opt.state.values()]
    assert [s for s, *_ in syncs] == ([1, 2] if log_every == 1 else [])  # nothing of the bad window was logged
    assert not hasattr(opt, "found_inf")


def test_the_guard_is_on_the_device_for_fused_optimizers_only():
    assert engine.guards_on_device(setup("adamw")[1]) and engine.guards_on_device(setup("sgd")[1])
    assert not engine.guards_on_device(setup("plain")[1])
    cfg = compose_config(["task=cnn", "optim.name=sgd"])
    from cnnrnn import build
    assert engine.guards_on_device(build.optimizer(cfg, nn.Linear(3, 2), 10)[0])


def test_a_later_finite_step_does_not_clear_the_flag():
    """Sticky: after a bad step every update up to the sync is skipped, finite or not."""
    before, _, _, _ = fit(data(1))
    model, _, _, exc = fit(data(8), nan_at=2, log_every=8)
    assert exc.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(before)))


def test_a_batch_already_on_the_device_is_used_as_it_is():
    """Data made on the training device (build.sources(device=)) is not copied again: pin_memory would refuse it."""
    on_device = {"image": torch.empty(2, 3, device="meta")}
    assert engine.to_device(on_device, torch.device("meta"))["image"] is on_device["image"]
    on_cpu = {"image": torch.zeros(2)}
    assert engine.to_device(on_cpu, CPU)["image"] is on_cpu["image"]


def test_log_every_is_checked():
    with pytest.raises(UserError, match="trainer.log_every=0 must be"):
        compose_config(["task=cnn", "trainer.log_every=0"])


# --- the pieces of train.run ----------------------------------------------------------------------------------

def test_setup_train_epoch_save_pieces(fake_root, tmp_path):
    cfg = compose_config(["task=cnn", *tiny(fake_root, "trainer.log_every=3", "trainer.ckpt_every=4")])
    r = train.setup(cfg, tmp_path / "run")
    assert r.rank == 0 and r.world == 1 and r.steps_per_epoch == 10 and r.eval_model is r.ema.module  # cnn: EMA
    assert r.st["global_step"] == 0 and r.ckpt_dir == tmp_path / "run" / "checkpoints"
    with train.StopSignals() as stop:
        record = train.train_epoch(r, stop)
    assert r.st["global_step"] == 10 and record["epoch"] == 1
    assert {"lr", "train/loss_running", "perf/ms_per_step", "perf/samples_per_s"} <= set(record)
    # the last checkpoint of the epoch was due at step 8, a sync step although 8 is not a multiple of 3
    assert load_checkpoint(r.ckpt_dir / "last.pt")["global_step"] == 8
    train.evaluate_epoch(r, record)
    assert "val/acc" in record and "train/acc" in record
    train.save(r, tmp_path / "x.pt", train.gather_rng(1), note="here")
    saved = load_checkpoint(tmp_path / "x.pt")
    assert saved["note"] == "here" and saved["global_step"] == 10 and saved["config"]["trainer"]["log_every"] == 3
    assert {"model", "train_model", "ema_n", "optimizer", "scheduler", "rng", "history"} <= set(saved)
    r.writer.close()


def test_a_window_that_does_not_divide_the_epoch_logs_every_step_and_matches_log_every_1(fake_root, tmp_path):
    from test_train import scalar
    a = train.run(compose_config(["task=cnn", *tiny(fake_root, "trainer.log_every=3")]), tmp_path / "a")
    b = train.run(compose_config(["task=cnn", *tiny(fake_root, "trainer.log_every=1")]), tmp_path / "b")
    assert scalar(tmp_path / "a", "train/loss") == scalar(tmp_path / "b", "train/loss")
    assert [s for s, _ in scalar(tmp_path / "a", "train/loss")] == list(range(1, 21))
    keys = [k for k in a if k.startswith(("test/", "val/"))]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


def test_ema_step_is_averaged_models_update_without_the_device_round_trip():
    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # a float and an integer buffer too
    ours = AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True)
    theirs = AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True)
    for _ in range(4):
        model(torch.randn(5, 3))  # moves batch norm's running stats and step count
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        engine.ema_step(ours, model)
        theirs.update_parameters(model)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 4
    for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_ema_is_updated_every_step(fake_root, tmp_path):
    cfg = compose_config(["task=cnn", *tiny(fake_root, "trainer.ema=0.9", "trainer.epochs=1")])  # cnn has an EMA
    r = train.setup(cfg, tmp_path / "run")
    with train.StopSignals() as stop:
        train.train_epoch(r, stop)
    assert int(r.ema.n_averaged) == 10 and r.eval_model is r.ema.module
    assert not all(torch.equal(a, b) for a, b in zip(r.model.parameters(), r.ema.module.parameters()))
    r.writer.close()
