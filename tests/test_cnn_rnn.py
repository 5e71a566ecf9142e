"""The CNN+LSTM decoder: decoding rules, beam search, label orders, and no ground truth at inference."""
from __future__ import annotations

import inspect

import pytest
import torch

from cnnrnn.models import build_model
from cnnrnn.tasks import LabelSequence

END = 10


def tiny_decoder(**kw):
    torch.manual_seed(0)
    kw = {"channels": (4, 8, 8), "cell": 0, "embed": 8, "hidden": 16, "attn_dim": 8, "dropout": 0.0, **kw}
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
    assert out["tokens"].shape == (8, 5) and out["alpha"].shape == (8, 5, 49)
    check_sequences(out["tokens"], out["labels"])
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
    task = LabelSequence(max_labels=4)
    x = torch.randint(0, 255, (6, 56, 56), dtype=torch.uint8)
    alone = task.predict(model, {"image": x})
    labels = torch.zeros(6, 10)
    labels[:, 0] = 1
    with_truth = task.predict(model, {"image": x, "labels": labels, "cells": torch.zeros(6, 4, dtype=torch.long)})
    for key in alone:
        assert torch.equal(alone[key], with_truth[key])
    assert list(inspect.signature(model.generate).parameters) == ["x", "beam_size", "flip", "max_labels"]  # no labels


LABELS = torch.tensor([[0, 1, 0, 1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                       [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.float)
CELLS = torch.tensor([[7, 3, -1, 1], [-1, 9, 9, -1], [2, 0, 3, 1]])


@pytest.mark.parametrize("order", ["frequency", "rare_first", "spatial", "random"])
def test_every_fixed_order_is_a_permutation_of_the_labels(order):
    counts = [50, 60, 10, 40, 5, 5, 5, 30, 5, 20]
    seq = LabelSequence(order=order, class_counts=counts).sequences(LABELS, CELLS)
    assert seq.shape == (3, 5)
    for row, hot in zip(seq.tolist(), LABELS):
        n = int(hot.sum())
        assert sorted(row[:n]) == hot.nonzero().flatten().tolist() and row[n] == END
        assert all(t == -100 for t in row[n + 1:])
    expected = {"frequency": [1, 3, 7], "rare_first": [7, 3, 1], "spatial": [7, 3, 1]}
    if order in expected:
        assert seq[0, :3].tolist() == expected[order]
    if order == "spatial":
        assert seq[2, :4].tolist() == [2, 0, 3, 1]


def test_orderless_targets_follow_the_models_ranking_and_cover_the_labels():
    class Ranker(torch.nn.Module):
        """Stands in for the decoder: logits that rank classes 9, 8, ..., 0, and records the targets."""
        def forward(self, x, teacher, steps=None):
            logits = torch.arange(11, dtype=torch.float).expand(len(x), 11).clone()
            self.targets = torch.stack([teacher(t, logits) for t in range(steps)], dim=1)
            return logits[:, None].expand(-1, steps, -1)

    model = Ranker()
    task = LabelSequence(order="orderless")
    task.loss(model, {"image": torch.zeros(3, 56, 56, dtype=torch.uint8), "labels": LABELS, "cells": CELLS})
    assert model.targets.tolist() == [[7, 3, 1, END, -100], [9, END, -100, -100, -100], [3, 2, 1, 0, END]]


def test_teacher_forcing_shapes_and_gradients():
    model = tiny_decoder().train()
    tokens = LabelSequence().sequences(LABELS, CELLS)
    logits = model(torch.randn(3, 1, 56, 56), tokens)
    assert logits.shape == (3, 5, 11)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten(), ignore_index=-100).backward()
    assert model.encoder.layers[0].weight.grad.abs().sum() > 0
