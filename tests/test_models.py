"""Every model: output shape, parameter count, a forward/backward pass, and clear errors for bad arguments."""
from __future__ import annotations

import pytest
import torch

from cnnrnn.errors import UserError
from cnnrnn.models import build_model, count_params
from cnnrnn.models.cnn import FastDropout


@pytest.mark.parametrize("name, kwargs, params", [
    ("lstm", {}, 162_574),                                # the write-up's LSTM, as the issue counts it
    ("lstm", {"hidden": 512, "layers": 2}, 3_216_394),    # lstm2
    ("cnn", {}, 421_738),
    ("cnn", {"pool_first": True, "flat_dropout": 0.0}, 421_738),  # the faster layer order: same weights
])
def test_single_label_models(name, kwargs, params):
    model = build_model(name, **kwargs)
    assert count_params(model) == params
    x = torch.randn(3, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_stays_small():
    assert count_params(build_model("cnn")) <= 500_000


def test_bce_head_gives_one_logit_per_class_for_any_canvas():
    model = build_model("cnn_bce", channels=(4, 8), convs=1)
    for side in (28, 56, 84):
        assert model(torch.randn(2, 1, side, side)).shape == (2, 10)


def test_unknown_or_mistyped_model_arguments_are_refused():
    with pytest.raises(UserError, match="Unknown config key 'model.hiden'"):
        build_model("lstm", hiden=3)
    with pytest.raises(UserError, match="model.hidden='big' must be of type int"):
        build_model("lstm", hidden="big")
    with pytest.raises(UserError, match="Unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(UserError, match=r"model.dropout=1.5 must be a probability in \[0, 1\)"):
        build_model("cnn", dropout=1.5)


def test_fast_dropout_drops_at_its_rate_keeps_the_mean_and_is_seeded():
    drop = FastDropout(0.3)
    x = torch.ones(64, 3136, dtype=torch.bfloat16)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 77 / 256) < 0.005                     # p rounded to a byte: 0.3 -> 77/256
    assert abs(y.float().mean().item() - 1) < 0.01              # kept elements are scaled up by 256/179
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)                              # the global seed fixes the mask
    x = torch.randn(4, 5, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)                     # gradients flow through kept elements only
    assert torch.equal(drop.eval()(x), x)                       # identity at evaluation
