"""The CNN+LSTM decoder: decoding rules, beam search, causality, feedback, counting, larger pictures, flips."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import fake_items, make_composites, sequence_task

from cnnrnn import engine
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.data.items import Split
from cnnrnn.data.loader import batches
from cnnrnn.models import build_model
from cnnrnn.models.cnn import read_cells

END = 10
LABELS = torch.tensor([[0, 1, 0, 1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                       [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
CELLS = torch.tensor([[7, 3, -1, 1], [-1, 9, 9, -1], [2, 0, 3, 1]])


def tiny_decoder(**kw):
    torch.manual_seed(0)
    kw = {"channels": (4, 8), "convs": 1, "cell_dim": 16, "embed": 8, "hidden": 16, "attn_dim": 8, "dropout": 0.0, **kw}
    return build_model("cnn_rnn", **kw).eval()


def check_sequences(tokens: torch.Tensor, labels: torch.Tensor, max_labels: int = 4):
    for row, hot in zip(tokens.tolist(), labels):
        assert END in row, "decoding must stop with END"
        cut = row.index(END)
        emitted = row[:cut]
        assert all(t == END for t in row[cut:]), "nothing but END after END"
        assert len(emitted) == len(set(emitted)) <= max_labels, "no label twice, at most grid*grid labels"
        assert set(emitted) == set(hot.nonzero().flatten().tolist())


@pytest.mark.parametrize("beam", [1, 3, 11])
def test_decoding_never_repeats_and_stops(beam):
    model = tiny_decoder()
    with torch.no_grad():  # an untrained decoder with a strong bias towards one class still may not repeat it
        model.out.bias[3] = 20.0
    out = model.generate(torch.randn(8, 1, 56, 56), beam_size=beam)
    assert out["tokens"].shape == (8, 5) and out["alpha"].shape == (8, 5, 4)
    check_sequences(out["tokens"], out["labels"])
    if beam == 1:  # greedy takes the favoured class first; a beam may prefer stopping at once (an equal cost)
        assert out["labels"][:, 3].all()
    assert ((out["scores"] >= 0) & (out["scores"] <= 1)).all()


def test_at_most_max_labels_even_if_end_is_never_likely():
    model = tiny_decoder(max_labels=2)
    with torch.no_grad():
        model.out.bias[END] = -50.0
    for beam in (1, 4):
        out = model.generate(torch.randn(4, 1, 56, 56), beam_size=beam)
        assert (out["labels"].sum(1) == 2).all()
        check_sequences(out["tokens"], out["labels"], max_labels=2)


def test_beam_size_one_is_greedy():
    model = tiny_decoder()
    x = torch.randn(16, 1, 56, 56)
    greedy, beam = model._greedy(x), model._beam(x, 1)
    assert torch.equal(greedy["tokens"], beam["tokens"]) and torch.equal(greedy["labels"], beam["labels"])
    assert torch.allclose(greedy["scores"], beam["scores"])


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    model = tiny_decoder()
    x = torch.randn(16, 1, 56, 56)

    def logp(tokens):  # log-probability of a decoded sequence under teacher forcing
        with torch.no_grad():
            lp = model(x, tokens).log_softmax(-1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 1:] = tokens[:, :-1] != END  # score up to and including the first END
        return (lp.gather(2, tokens[..., None]).squeeze(-1) * mask).sum(1)

    greedy, beam = model.generate(x, beam_size=1), model.generate(x, beam_size=5)
    assert (logp(beam["tokens"]) >= logp(greedy["tokens"]) - 1e-4).all()


def test_no_ground_truth_reaches_the_decoder_at_inference():
    model = tiny_decoder()
    task = sequence_task()
    x = torch.randint(0, 255, (6, 56, 56), dtype=torch.uint8)
    alone = task.predict(model, {"image": x})
    labels = torch.zeros(6, 10)
    labels[:, 0] = 1
    with_truth = task.predict(model, {"image": x, "labels": labels, "cells": torch.zeros(6, 4, dtype=torch.long)})
    for key in alone:
        assert torch.equal(alone[key], with_truth[key])
    assert list(inspect.signature(model.generate).parameters) == ["x", "beam_size", "flip", "max_labels"]  # no labels


def test_teacher_forcing_shapes_and_gradients_reach_the_reader():
    model = tiny_decoder().train()
    tokens = sequence_task().sequences(LABELS, CELLS)
    logits = model(torch.randn(3, 1, 56, 56), tokens)
    assert logits.shape == (3, 5, 11)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), ignore_index=-100).backward()
    assert model.reader.encoder.layers[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_step_t_logits_see_only_the_teacher_labels_before_t(mode):
    """Changing the teacher's label at step t leaves logits 0..t as they were and changes the later ones."""
    model = tiny_decoder(dropout=0.3)
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


def test_feedback_off_ignores_the_fed_label():
    x = torch.randn(5, 1, 56, 56)
    a, b = torch.tensor([[1, 2, 3, 10, 0]] * 5), torch.tensor([[7, 8, 9, 10, 0]] * 5)
    ablated = tiny_decoder(feedback=False)
    assert torch.equal(ablated(x, a), ablated(x, b))
    full = tiny_decoder()
    out_a, out_b = full(x, a), full(x, b)
    assert torch.equal(out_a[:, 0], out_b[:, 0]) and not torch.allclose(out_a[:, 1:], out_b[:, 1:])


def counting_decoder(target: str):
    model = tiny_decoder(target=target)
    with torch.no_grad():  # one class strongly preferred, END never likely
        model.out.bias[3], model.out.bias[END] = 20.0, -50.0
    return model


@pytest.mark.parametrize("side,cells", [(56, 4), (84, 9)])
def test_count_mask_repeats_while_cells_remain_and_never_names_more_items_than_cells(side, cells):
    x = torch.randn(3, 1, side, side)
    for beam in (1, 3):
        out = counting_decoder("multiset").generate(x, beam_size=beam, max_labels=cells)
        assert (out["counts"][:, 3] == cells).all() and (out["counts"].sum(1) == cells).all()
        assert (out["tokens"][:, cells] == END).all()
        out = counting_decoder("set").generate(x, beam_size=beam, max_labels=cells)
        assert (out["counts"] <= 1).all()  # the set decoder never repeats a class
    allowed = counting_decoder("multiset")._allowed
    assert allowed(torch.tensor([[3] + [0] * 9]), t=3, limit=4)[0].all()  # a repeat while a cell is unfilled
    assert allowed(torch.tensor([[4] + [0] * 9]), t=4, limit=4)[0].tolist() == [False] * 10 + [True]  # then END


def test_on_a_larger_picture_the_decoder_reads_the_occupied_cells_and_only_enough_empty_ones():
    net = tiny_decoder(max_labels=4)                           # trained on 2x2: 4 cells
    images = torch.zeros(3, 84, 84, dtype=torch.uint8)

    def fill(i, cell, high=256):
        r, c = divmod(cell, 3)
        images[i, 28 * r: 28 * r + 28, 28 * c: 28 * c + 28] = torch.randint(0, high, (28, 28), dtype=torch.uint8)

    for cell in (1, 5):
        fill(0, cell)
    for cell in range(6):
        fill(1, cell)
    fill(2, 4)
    fill(2, 0, high=3)                                  # a faint speck of noise: still an empty cell
    read = net.cells_read(FORMAT.to_input(images), 3, 3)
    cells = lambda *on: [i in on for i in range(9)]    # noqa: E731
    assert read[0].tolist() == cells(0, 1, 2, 5)        # the 2 items and the first 2 empty cells: 4 in all
    assert read[1].tolist() == cells(*range(6))         # more items than 4 cells: every item, no empty cell
    assert read[2].tolist() == cells(0, 1, 2, 4)
    assert net.cells_read(FORMAT.to_input(images[:, :56, :56]), 2, 2) is None           # the training size: all
    feats, _, (h, _), _ = net.encode(FORMAT.to_input(images))          # the initial state: from the cells read only
    assert torch.allclose(h[0], torch.tanh(net.init_h(feats[0, read[0]].mean(0))), atol=1e-6)
    out = net.generate(FORMAT.to_input(images), max_labels=9)
    alpha = out["alpha"][:, :1]                                                   # (3, 1, 9): the first step
    assert (alpha[~read[:, None]] == 0).all() and torch.allclose(alpha.sum(-1), torch.ones(3, 1))


def test_test_time_flips_average_a_mirrored_encoding():
    net = tiny_decoder()
    x = torch.randn(3, 1, 56, 56)
    feats, _, _, _ = net.encode(x)
    mirrored, _, _, _ = net.encode(x.flip(-1))
    both, _, _, _ = net.encode(x, flip=True)
    # (B, L=4, D): mirroring the canvas swaps the left and right cells of each row
    assert torch.allclose(both, (feats + mirrored[:, [1, 0, 3, 2]]) / 2, atol=1e-5)


def test_decoding_cell_features_equals_decoding_the_picture():
    net = tiny_decoder()
    x = torch.randn(4, 1, 56, 56)
    from_pixels, from_feats = net.generate(x), net.generate(read_cells(net.reader, x))
    assert torch.equal(from_pixels["tokens"], from_feats["tokens"])
    assert torch.allclose(from_pixels["scores"], from_feats["scores"], atol=1e-6)


def test_the_decoder_learns_tiny_synthetic_composites():
    """100 steps of train_steps on fake composites: the loss falls and the label sets come out right."""
    torch.manual_seed(0)
    images, labels = fake_items(400, 0)
    split = Split(torch.from_numpy(images), torch.from_numpy(labels).long())
    train_src = make_composites(split, 32 * 100, grid=2, seed=1)
    test_src = make_composites(split, 200, grid=2, seed=2, fixed=True)
    task = sequence_task(order="frequency", class_counts=torch.bincount(split.labels, minlength=10))
    model = build_model("cnn_rnn", channels=(4, 8), convs=1, cell_dim=16, embed=8, hidden=32, attn_dim=8,
                        dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add contention on a shared machine
    try:
        for window in engine.train_steps(model, task, optimizer, scheduler,
                                         batches(train_src, 32, epoch=0, drop_last=True), device=torch.device("cpu")):
            losses += window.losses
        m, _, _ = engine.score(model, task, test_src, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 100
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first / 3, (first, last)
    assert m["f1_samples"] > 0.8 and m["exact_match"] > 0.5, m
