"""Issue 11's data-parallel rules and the tests it found missing: per-rank randomness, agreed stops, honoured
amp, a decoder that learns, and a decoder whose step t cannot see the teacher's label t."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cnnrnn import engine, ranks
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import Split
from cnnrnn.data.loader import ItemSource, batches
from cnnrnn.engine import resolve_amp, rng_state
from cnnrnn.errors import UserError
from cnnrnn.models import build_model
from cnnrnn.tasks import LabelSequence
from conftest import fake_items

# --- amp -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_amp_setting_is_honoured_on_cuda_and_auto_needs_native_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_amp(False, cuda) is False  # the bug: bf16 was forced on CUDA whatever the setting
    assert resolve_amp(None, cuda) is native
    assert resolve_amp(None, cpu) is False and resolve_amp(True, cpu) is True and resolve_amp(False, cpu) is False
    if native:
        assert resolve_amp(True, cuda) is True
    else:
        with pytest.raises(UserError, match="trainer.amp=false"):
            resolve_amp(True, cuda)


# --- per-rank randomness ----------------------------------------------------------------------------------------

def test_each_ranks_items_get_their_own_augmentation():
    # every item the same asymmetric image: what differs between the ranks' i-th items is only the draw
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[5:20, 3:9] = 200
    split = Split(image.expand(256, 28, 28).clone(), torch.zeros(256, dtype=torch.long))
    src = ItemSource(split, seed=1, augment=Augment(hflip=0.5, shift=2), fixed=False)
    one = list(batches(src, 64, epoch=0, drop_last=True))
    ranks = [list(batches(src, 64, epoch=0, drop_last=True, rank=r, world=2)) for r in (0, 1)]
    for step in range(len(one)):
        a, b = ranks[0][step]["image"], ranks[1][step]["image"]
        assert not torch.equal(a, b), f"step {step}: both ranks' items drew the same flips and shifts"
        assert len(a) + len(b) == len(one[step]["image"])  # the global batch, split
    # one process keeps its keys: a run's augmentation does not change with this fix
    key = (1 * 1_000_003) % 2**31
    assert torch.equal(one[1]["image"], src.batch(torch.randperm(256, generator=torch.Generator().manual_seed(key))
                                                  [64:128], key=(key * 10_007 + 1) % 2**31)["image"])


def test_rank_seeds_keep_rank_zero_and_differ_per_rank():
    assert ranks.rank_seed(7, 0) == 7  # a one-process run draws exactly as before
    seeds = {ranks.rank_seed(7, r) for r in range(4)} | {ranks.rank_seed(8, r) for r in range(4)}
    assert len(seeds) == 8 and ranks.rank_seed(7, 1) == ranks.rank_seed(7, 1)
    masks = []
    for r in (0, 1):
        ranks.seed_everything(ranks.rank_seed(7, r))
        masks.append(F.dropout(torch.ones(1000), 0.5))
    assert not torch.equal(*masks)


def test_a_resumed_rank_gets_back_its_own_generators():
    states = []
    for r in (0, 1):
        ranks.seed_everything(ranks.rank_seed(3, r))
        states.append(rng_state())
    expected = torch.rand(3), random.random(), np.random.rand()  # rank 1's next draws
    saved = {"rng": states[0], "rng_ranks": states, "config": {"seed": 3}, "global_step": 10}
    ranks.restore_rng(saved, 1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    ranks.restore_rng(saved, 2)  # a rank the checkpoint has no state for: its own fresh stream
    third = torch.rand(3)
    ranks.restore_rng(saved, 0)
    assert not torch.equal(third, torch.rand(3))


# --- stop signals -----------------------------------------------------------------------------------------------

def _agree(rank: int, world: int, store: str, out) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        stop = ranks.StopSignals()
        stop.signum = signal.SIGTERM if rank == 1 else None  # only rank 1 was signalled
        out.put((rank, stop.agreed(world, torch.device("cpu"))))
    finally:
        dist.destroy_process_group()


def test_a_stop_signal_on_one_rank_stops_every_rank(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_agree, args=(r, 2, str(tmp_path / "store"), out)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, "a rank did not finish the agreement"
    answers = dict(out.get(timeout=5) for _ in procs)
    assert answers == {0: signal.SIGTERM, 1: signal.SIGTERM}
    stop = ranks.StopSignals()
    assert stop.agreed(1, torch.device("cpu")) is None  # one process: no collective, just the flag
    stop.signum = signal.SIGINT
    assert stop.agreed(1, torch.device("cpu")) == signal.SIGINT


# --- the decoder ------------------------------------------------------------------------------------------------

def test_the_decoder_learns_tiny_synthetic_composites():
    """100 steps (about 2 CPU seconds) on composites of fake items (a bright bar per class): the loss falls and
    the label sets come out right, far above the ~0.36 f1_samples of naming every class."""
    torch.manual_seed(0)
    images, labels = fake_items(400, 0)
    split = Split(torch.from_numpy(images), torch.from_numpy(labels).long())
    train_src = CompositeSource(split, 32 * 100, grid=2, seed=1)
    test_src = CompositeSource(split, 200, grid=2, seed=2, fixed=True)
    task = LabelSequence(order="frequency", class_counts=torch.bincount(split.labels, minlength=10))
    model = build_model("cnn_rnn", channels=(4, 8), cell=7, cell_dim=16, embed=8, hidden=32, attn_dim=8,
                        dropout=0.0, pool_first=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add contention on a shared machine (36 s instead of 2)
    try:
        engine.train_one_epoch(model, task, optimizer, scheduler, batches(train_src, 32, epoch=0, drop_last=True),
                               device=torch.device("cpu"), on_sync=lambda s, window, st, n: losses.extend(window))
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 100
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 3, (first, last)
    m, _, _ = engine.evaluate(model, task, batches(test_src, 100), device=torch.device("cpu"))
    assert m["f1_samples"] > 0.8 and m["exact_match"] > 0.5, m


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_step_t_logits_see_only_the_teacher_labels_before_t(mode):
    """Changing the teacher's label at step t leaves logits 0..t as they were and changes the later ones."""
    torch.manual_seed(0)
    model = build_model("cnn_rnn", channels=(4, 8), cell=7, cell_dim=16, embed=8, hidden=16, attn_dim=8,
                        dropout=0.3)
    getattr(model, mode)()
    x = torch.randn(3, 1, 56, 56)
    tokens = torch.tensor([[1, 2, 3, 4, 10], [5, 10, -100, -100, -100], [0, 6, 10, -100, -100]])

    def logits(teacher):
        torch.manual_seed(1)  # the same dropout masks in every call (train mode)
        with torch.no_grad():
            return model(x, teacher, steps=5)

    base = logits(tokens)
    for t in range(4):
        changed = tokens.clone()
        changed[:, t] = 8
        out = logits(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"step <= {t} saw the label fed after step {t}"
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:]), f"steps after {t} ignore the label of step {t}"

    # the teacher function of orderless training is asked for step t's target only after step t's logits exist
    seen = []

    def teacher(step, step_logits):
        seen.append((step, step_logits.clone()))
        return torch.full((3,), step, dtype=torch.long)

    out = logits(teacher)
    assert [s for s, _ in seen] == list(range(5))
    assert all(torch.equal(out[:, s], lg) for s, lg in seen)


if __name__ == "__main__":
    pytest.main([os.path.abspath(__file__), "-q"])
