"""Model registry: build_model(name, **kwargs), with unknown or mistyped arguments refused clearly."""
from __future__ import annotations

import inspect

from torch import nn

from cnnrnn.errors import UserError
from cnnrnn.models.cnn import CNNBCE, SmallCNN
from cnnrnn.models.cnn_rnn import CNNRNN
from cnnrnn.models.lstm import RowLSTM

MODELS: dict[str, type[nn.Module]] = {"lstm": RowLSTM, "cnn": SmallCNN, "cnn_rnn": CNNRNN, "cnn_bce": CNNBCE}


def build_model(name: str, **kwargs) -> nn.Module:
    """The model `name` with keyword arguments as in its constructor (lists become tuples)."""
    if name not in MODELS:
        raise UserError(f"Unknown model '{name}'; choose one of {', '.join(MODELS)}.")
    params = inspect.signature(MODELS[name]).parameters
    for key, value in kwargs.items():
        if key not in params:
            raise UserError(f"Unknown config key 'model.{key}' for model {name}; it takes "
                            f"{', '.join(p for p in params if p != 'num_classes')}.")
        default = params[key].default
        if isinstance(default, tuple):
            kwargs[key] = value = tuple(value) if isinstance(value, (list, tuple)) else value
        expected = float if isinstance(default, float) else type(default)
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int))
        if default is not None and (not ok or isinstance(value, bool) != isinstance(default, bool)):
            raise UserError(f"model.{key}={value!r} must be of type {expected.__name__} like its default "
                            f"{default!r}.")
        if key.endswith("dropout") and value is not None and not 0 <= value < 1:
            raise UserError(f"model.{key}={value!r} must be a probability in [0, 1), e.g. 0.3.")
    return MODELS[name](**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
