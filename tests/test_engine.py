"""The loop's pieces: train_steps windows, NaN guards, score(), the EMA step, autocast settings, freed memory."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import bce_task, fake_items, make_composites
from torch import nn

from cnnrnn import build, engine
from cnnrnn.config import preset
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.data.items import Split
from cnnrnn.engine import NonFiniteLoss, resolve_amp
from cnnrnn.errors import UserError

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


def fit(batches, optim="adamw", nan_at=None, stop_at=None, **kwargs):
    """(model, optimizer, windows, NonFiniteLoss or None); `stop_at`: break after the window reaching that step."""
    model, opt, sched = setup(optim)
    windows = []
    try:
        for window in engine.train_steps(model, Tiny(nan_at), opt, sched, batches, device=CPU, **kwargs):
            windows.append(window)
            if stop_at is not None and window.step >= stop_at:
                break
    except NonFiniteLoss as exc:
        return model, opt, windows, exc
    return model, opt, windows, None


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_windows_come_every_log_every_steps_at_due_checkpoints_and_after_the_last_batch():
    _, _, windows, error = fit(data(8), log_every=3, sync_every=4, first_step=10)
    assert error is None
    assert [(w.step, len(w.losses)) for w in windows] == [(12, 2), (15, 3), (16, 1), (18, 2)]
    assert set(windows[0].stats) == {"acc"} and 0 <= windows[0].stats["acc"] <= 1  # the window's mean stats
    _, _, windows, _ = fit(data(8))                                                # log_every 1: every step
    assert [w.step for w in windows] == list(range(1, 9)) and all(len(w.losses) == 1 for w in windows)


def test_the_window_changes_nothing_but_when_python_sees_the_losses():
    model_1, _, windows_1, _ = fit(data(8), log_every=1)
    model_5, _, windows_5, _ = fit(data(8), log_every=5)
    assert [x for w in windows_1 for x in w.losses] == [x for w in windows_5 for x in w.losses]
    assert all(torch.equal(a, b) for a, b in zip(weights(model_1), weights(model_5)))


def test_the_host_reads_tensors_only_at_syncs(monkeypatch):
    """12 steps with log_every=4 read the losses and the mean stat from the device 3 times each, nothing else."""
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name)
                            or _real(self, *a))
    _, _, windows, _ = fit(data(12), log_every=4)
    monkeypatch.undo()
    assert len(windows) == 3 and sorted(reads) == ["item"] * 3 + ["tolist"] * 3


def test_a_break_at_a_window_ends_the_epoch_after_that_windows_steps():
    model, opt, windows, _ = fit(data(8), log_every=2, stop_at=4)
    assert [w.step for w in windows] == [2, 4]
    only_four, _, _, _ = fit(data(4), log_every=2)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(only_four)))  # steps 5-8 never ran
    assert not hasattr(opt, "found_inf")                                                 # the guard is taken away


@pytest.mark.parametrize("optim", ["adamw", "sgd", "plain"])
@pytest.mark.parametrize("log_every", [1, 4])
def test_a_nan_loss_never_reaches_the_weights(optim, log_every):
    """A NaN at step 3 is named, and the weights and step counts are those after step 2."""
    before, before_opt, _, _ = fit(data(2), optim)
    model, opt, windows, exc = fit(data(8), optim, nan_at=3, log_every=log_every)
    assert isinstance(exc, NonFiniteLoss) and exc.step == 3 and exc.value != exc.value
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(before)))
    steps = [s.get("step") for s in opt.state.values()]
    assert steps == [s.get("step") for s in before_opt.state.values()]
    assert [w.step for w in windows] == ([1, 2] if log_every == 1 else [])  # nothing of the bad window was logged
    assert not hasattr(opt, "found_inf")


def test_the_guard_is_on_the_device_for_fused_optimizers_only():
    assert engine.guards_on_device(setup("adamw")[1]) and engine.guards_on_device(setup("sgd")[1])
    assert not engine.guards_on_device(setup("plain")[1])
    assert engine.guards_on_device(build.optimizer(preset("cnn", optim={"name": "sgd"}), nn.Linear(3, 2), 10)[0])


def test_a_later_finite_step_does_not_clear_the_flag():
    """Sticky: after a bad step every update up to the sync is skipped, finite or not."""
    before, _, _, _ = fit(data(1))
    model, _, _, exc = fit(data(8), nan_at=2, log_every=8)
    assert exc.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(before)))


def test_an_ema_is_updated_after_every_step():
    model, opt, sched = setup()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True)
    list(engine.train_steps(model, Tiny(), opt, sched, data(5), device=CPU, log_every=5, ema=ema))
    assert int(ema.n_averaged) == 5
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), ema.module.parameters()))


def test_ema_step_is_averaged_models_update_without_the_device_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))  # a float and an integer buffer too
    ours = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True)
    theirs = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=engine.ema_update(0.9), use_buffers=True)
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


def test_a_batch_already_on_the_device_is_used_as_it_is():
    """Data made on the training device is not copied again: pin_memory would refuse it."""
    on_device = {"image": torch.empty(2, 3, device="meta")}
    assert engine.to_device(on_device, torch.device("meta"))["image"] is on_device["image"]
    on_cpu = {"image": torch.zeros(2)}
    assert engine.to_device(on_cpu, CPU)["image"] is on_cpu["image"]


@pytest.mark.parametrize("native", [True, False])
def test_amp_setting_is_honoured_on_cuda_and_auto_needs_native_bf16(monkeypatch, tmp_path, native):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_amp(False, cuda) is False  # the bug: bf16 was forced on CUDA whatever the setting
    assert resolve_amp(None, cuda) is native
    real_open = open
    flags = "flags\t\t: fpu sse avx512f" + (" avx512_bf16" if native else "") + "\n"
    monkeypatch.setattr("builtins.open", lambda name, *a, **k: (
        io.StringIO(flags) if name == "/proc/cpuinfo" else real_open(name, *a, **k)))
    assert resolve_amp(None, cpu) is native  # auto: bf16 where the CPU has bf16 units, fp32 where it emulates them
    assert resolve_amp(True, cpu) is True and resolve_amp(False, cpu) is False
    if native:
        assert resolve_amp(True, cuda) is True
    else:
        with pytest.raises(UserError, match="trainer.amp=false"):
            resolve_amp(True, cuda)


def test_score_gives_the_metrics_predictions_and_targets_of_a_whole_split_and_leaves_the_rng_alone():
    images, labels = fake_items(200, 0)
    src = make_composites(Split(torch.from_numpy(images), torch.from_numpy(labels).long()), 30, seed=1, fixed=True)
    torch.manual_seed(0)
    model = build.model(preset("multilabel_bce", model={"channels": [4, 8], "convs": 1, "cell_dim": 16}), FORMAT)
    task = bce_task()
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    result, out, target = engine.score(model, task, src, CPU)
    assert torch.equal(torch.rand(3), expected_next)        # scoring draws from its own generator
    assert out["scores"].shape == (30, 10) and torch.equal(target, src.batch(src.order(None))["labels"])
    assert {"f1_samples", "exact_match", "loss"} <= set(result)
    again, _, _ = engine.score(model, task, src, CPU)
    assert again == result and not model.training
    assert "loss" not in engine.score(model, task, src, CPU, with_loss=False)[0]


def test_evaluation_batches_hold_the_same_number_of_cells_on_any_grid():
    class Grid:
        def __init__(self, grid):
            self.grid = grid
    assert engine.eval_batch(object()) == engine.eval_batch(Grid(2)) == engine.EVAL_BATCH
    assert engine.eval_batch(Grid(4)) == engine.EVAL_BATCH // 4 and engine.eval_batch(Grid(16)) >= 1


REALLOCATE = """
import resource, sys, torch
from cnnrnn.engine import keep_freed_memory

def faults():
    # warm-up: glibc takes a few rounds (up to 6 seen) to settle where a freed 64 MB block lives
    for _ in range(10):
        torch.empty(1 << 24).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):                           # freed and allocated again, as a step's activations are
        torch.empty(1 << 24).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
kept = keep_freed_memory()
print(kept, default, faults())
"""


def test_freed_activations_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", REALLOCATE], capture_output=True, text=True, check=True)
    kept, without, with_keep = out.stdout.split()
    if kept != "True":
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    # by default glibc maps a 64 MB block afresh each time: all of its 16,384 pages fault in again
    assert int(without) > 10 * 16_000 and int(with_keep) < int(without) / 2
