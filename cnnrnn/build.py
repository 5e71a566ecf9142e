"""Objects from a validated Config: data sources, task, model, optimizer and schedule. No Hydra here."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cnnrnn.config import Config
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import CLASSES, Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.errors import UserError
from cnnrnn.models import build_model
from cnnrnn.tasks import Classification, LabelSequence, MultiLabelBCE

TASK_KEYS = ("label_order",)  # model.* keys that configure the task (training targets), not the module


@dataclass
class Sources:
    train: object       # drawn afresh (order, composites, augmentation) every epoch
    train_eval: object  # fixed training items/composites, scored each epoch for the train curves
    val: object
    test: object


def sources(cfg: Config, data: dict[str, Split]) -> Sources:
    d = cfg.data
    augment = Augment(d.hflip, d.shift, d.erase) if d.augment else None
    n_eval = min(d.train_eval_size, len(data["train"]))
    if cfg.kind == "single":
        return Sources(ItemSource(data["train"], cfg.seed, augment),
                       ItemSource(data["train"].subset(torch.arange(n_eval))),
                       ItemSource(data["val"]), ItemSource(data["test"]))
    grid = dict(grid=d.grid, min_items=d.min_items, max_items=d.max_items)
    # Fixed composites are seeded by data.seed only: identical across runs, seeds and models.
    return Sources(
        CompositeSource(data["train"], d.epoch_size or len(data["train"]), seed=cfg.seed, augment=augment, **grid),
        CompositeSource(data["train"], n_eval, seed=d.seed + 3, fixed=True, **grid),
        CompositeSource(data["val"], d.val_size, seed=d.seed + 1, fixed=True, **grid),
        CompositeSource(data["test"], d.test_size, seed=d.seed + 2, fixed=True, **grid),
    )


def task(cfg: Config, train_labels: torch.Tensor | None = None, state: dict | None = None):
    """The task object; `state` restores what a checkpoint saved (a tuned threshold)."""
    state = state or {}
    if cfg.kind == "single":
        return Classification(CLASSES, cfg.optim.label_smoothing)
    if cfg.kind == "bce":
        return MultiLabelBCE(CLASSES, state.get("threshold", 0.5))
    counts = None if train_labels is None else torch.bincount(train_labels, minlength=len(CLASSES))
    return LabelSequence(CLASSES, cfg.model["label_order"], counts, max_labels=cfg.data.grid ** 2,
                         label_smoothing=cfg.optim.label_smoothing)


def model(cfg: Config) -> nn.Module:
    kwargs = {k: v for k, v in cfg.model.items() if k != "name" and k not in TASK_KEYS}
    if cfg.model["name"] == "cnn_rnn":
        kwargs["max_labels"] = cfg.data.grid ** 2  # decoding stops at END or after one label per cell
    return build_model(cfg.model["name"], num_classes=len(CLASSES), **kwargs)


def optimizer(cfg: Config, net: nn.Module, steps_per_epoch: int):
    """AdamW or SGD (fused where the device allows) and a per-step schedule: linear warm-up, then cosine."""
    o = cfg.optim
    decay = [p for p in net.parameters() if p.ndim > 1]      # no weight decay on biases and norm scales
    rest = [p for p in net.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if o.name == "adamw":
        # One fused kernel for the whole update (CPU and CUDA, torch >= 2.4): measurably faster per step.
        opt = torch.optim.AdamW(groups, lr=o.lr, fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True, foreach=True)
    total = max(1, cfg.trainer.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if o.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_sizes(cfg: Config, n_train: int, world: int = 1) -> None:
    per_epoch = cfg.data.epoch_size or n_train if cfg.kind != "single" else n_train
    if per_epoch < cfg.trainer.batch_size:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {per_epoch} training "
                        f"samples per epoch; lower trainer.batch_size or raise data.limit.")
    if cfg.trainer.batch_size % world:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must divide evenly "
                        f"among {world} processes; make it a multiple of {world}.")


def from_checkpoint(state: dict, path, device: torch.device | str = "cpu"):
    """(config, model in eval mode, task) of a loaded checkpoint; a sentence if the weights do not fit."""
    from cnnrnn.config import from_dict

    try:
        cfg = from_dict(state["config"])
    except (UserError, KeyError, TypeError) as exc:
        raise UserError(f"{path} carries no usable config ({exc}); use a checkpoint written by cnnrnn.") from None
    net = model(cfg)
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        reason = str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()
        raise UserError(f"{path} holds weights that do not fit a {cfg.model['name']} model of task={cfg.task} "
                        f"({reason}); it comes from another model family or version.") from None
    return cfg, net.to(device).eval(), task(cfg, state=state.get("task_state"))
