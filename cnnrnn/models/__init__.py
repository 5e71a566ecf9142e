"""Model registry: build_model(name, **kwargs), with unknown or mistyped arguments refused clearly."""
from __future__ import annotations

import inspect
import math

from torch import nn

from cnnrnn.errors import UserError
from cnnrnn.models.cnn import CNNBCE, SmallCNN
from cnnrnn.models.cnn_rnn import CNNRNN
from cnnrnn.models.lstm import RowLSTM

ZERO_ALLOWED = ("cell",)  # model.cell=0: no cell embedding
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
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"model.{key}={value!r} must be a finite number.")
        # sizes: a zero-sized layer is a traceback deep inside torch, or a model that cannot learn
        least = 0 if key in ZERO_ALLOWED else 1
        sizes = value if isinstance(value, tuple) else (value,)
        if isinstance(default, (int, tuple)) and not isinstance(value, bool) and (
                any(isinstance(v, int) and not isinstance(v, bool) and v < least for v in sizes)):
            raise UserError(f"model.{key}={list(value) if isinstance(value, tuple) else value} must be "
                            f"{'0 or more' if least == 0 else 'at least 1'}"
                            f"{' in every entry' if isinstance(value, tuple) else ''}.")
    return MODELS[name](**kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
