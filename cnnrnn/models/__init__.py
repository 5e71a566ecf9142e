"""Model registry: each model's class, its kind of task, and its config keys (the constructor's arguments, whose
defaults are the models' defaults, plus the keys its task reads); build_model checks them in one sentence."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

from torch import nn

from cnnrnn.errors import UserError
from cnnrnn.models.cnn import CNNBCE, SmallCNN
from cnnrnn.models.cnn_rnn import CNNRNN
from cnnrnn.models.lstm import RowLSTM

INTERNAL = ("num_classes", "max_labels", "side", "width", "in_channels")  # set from the data, never by a config
LABEL_ORDERS = ("frequency", "rare_first", "spatial", "random", "orderless")
TARGETS = ("set", "multiset")
ENCODERS = ("auto", "cells", "picture")


@dataclass(frozen=True)
class Spec:
    cls: type[nn.Module]
    kind: str                               # single | bce | sequence: which task trains it (tasks.make_task)
    extras: dict = field(default_factory=dict)  # keys of the model group that its task reads, with defaults
    choices: dict = field(default_factory=dict)  # keys whose value is one of a few names

    def defaults(self) -> dict:
        params = inspect.signature(self.cls).parameters.values()
        args = {p.name: list(p.default) if isinstance(p.default, tuple) else p.default
                for p in params if p.name not in INTERNAL}
        return {**args, **self.extras}

    def check(self, keys: dict) -> None:
        """Refuse an unknown key, a value of the wrong type, a size below 1 or a dropout outside [0, 1)."""
        params = inspect.signature(self.cls).parameters
        for key, value in keys.items():
            if key in self.choices and value not in self.choices[key]:
                raise UserError(f"model.{key}={value!r} must be one of {', '.join(self.choices[key])}.")
            if key == "init_from" and not (value is None or isinstance(value, str) and value):
                raise UserError(f"model.init_from={value!r} must be the path of a checkpoint, or null.")
            if key in self.extras:
                continue
            if key == "name":
                raise UserError("model.name is no setting: each task trains its own model; choose the task instead "
                                "(task=cnn, task=multilabel, ...).")
            if key not in params or key in INTERNAL:
                raise UserError(f"Unknown config key 'model.{key}'; this task's model takes "
                                f"{', '.join(p for p in [*params, *self.extras] if p not in INTERNAL)}.")
            check_value(key, value, params[key].default)


def check_value(key: str, value, default) -> None:
    """A model argument of its default's type; sizes at least 1, dropouts in [0, 1), numbers finite."""
    expected = float if isinstance(default, float) else list if isinstance(default, tuple) else type(default)
    ok = isinstance(value, (list, tuple)) if expected is list else (
        isinstance(value, expected) or (expected is float and isinstance(value, int)))
    if default is not None and (not ok or isinstance(value, bool) != isinstance(default, bool)):
        raise UserError(f"model.{key}={value!r} must be of type {expected.__name__} like its default "
                        f"{list(default) if isinstance(default, tuple) else default!r}.")
    if key.endswith("dropout") and value is not None and not 0 <= value < 1:
        raise UserError(f"model.{key}={value!r} must be a probability in [0, 1), e.g. 0.3.")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"model.{key}={value!r} must be a finite number.")
    # sizes: a zero-sized layer is a traceback deep inside torch, or a model that cannot learn
    sizes = value if isinstance(value, (list, tuple)) else (value,)
    if isinstance(default, (int, tuple)) and not isinstance(value, bool) and (
            any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in sizes)):
        raise UserError(f"model.{key}={list(sizes) if isinstance(value, (list, tuple)) else value} must be "
                        f"at least 1{' in every entry' if isinstance(value, (list, tuple)) else ''}.")


MODELS: dict[str, Spec] = {
    "lstm": Spec(RowLSTM, "single"),
    "cnn": Spec(SmallCNN, "single"),
    "cnn_rnn": Spec(CNNRNN, "sequence", {"label_order": "frequency", "init_from": None},
                    {"label_order": LABEL_ORDERS, "target": TARGETS, "encoder": ENCODERS}),
    "cnn_bce": Spec(CNNBCE, "bce", {"init_from": None}, {"encoder": ENCODERS}),
}


def model_keys(name: str) -> dict:
    """The model group of a config for model `name`: every key with its default."""
    return MODELS[name].defaults()


def build_model(name: str, **kwargs) -> nn.Module:
    """The model `name` with arguments as in its constructor (lists become tuples); a config's model group can be
    passed as it is (`build_model("cnn", **cfg.model, num_classes=10)`): the keys its task reads are left out."""
    spec = MODELS[name]
    spec.check({k: v for k, v in kwargs.items() if k not in INTERNAL})
    takes = inspect.signature(spec.cls).parameters
    return spec.cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()
                       if k not in spec.extras and (k not in INTERNAL or k in takes)})


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
