"""Objects from a validated Config: model, optimizer and schedule, a checkpoint's model and task, and the checks
that refuse a config before any work. No Hydra here."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from cnnrnn import checkpoint
from cnnrnn.config import MODEL_OF, Config, from_dict
from cnnrnn.data import sources
from cnnrnn.data.items import Format
from cnnrnn.errors import UserError
from cnnrnn.models import build_model
from cnnrnn.models.cnn import SmallCNN
from cnnrnn.tasks import Task, make_task


def model(cfg: Config, fmt: Format) -> nn.Module:
    """The task's model for items of `fmt`. Decoding stops at END or after one label per cell of the largest training
    grid (tasks.LabelSequence passes each picture's own limit instead)."""
    keys = {**cfg.model, "encoder": encoder(cfg, fmt)} if "encoder" in cfg.model else cfg.model
    return build_model(MODEL_OF[cfg.task], **keys, num_classes=len(fmt.classes), max_labels=max(cfg.data.grids) ** 2,
                       side=fmt.size, width=fmt.channels * fmt.size, in_channels=fmt.channels)


def encoder(cfg: Config, fmt: Format) -> str:
    """model.encoder, or for auto what the data allow: cells for a grid of items, the picture encoder for pictures
    without cells (a CSV of pictures, items scattered at free positions)."""
    if cfg.model["encoder"] != "auto":
        return cfg.model["encoder"]
    return "picture" if fmt.picture or cfg.data.layout == "scatter" else "cells"





def optimizer(cfg: Config, net: nn.Module, steps_per_epoch: int):
    """AdamW or SGD (fused where the device allows) and a per-step schedule: linear warm-up, then cosine."""
    o = cfg.optim
    reader_lr = o.reader_lr if cfg.model.get("init_from") else 1.0  # a reader trained before: its own rate
    groups: dict[tuple, list] = {}
    for name, p in net.named_parameters():
        if p.requires_grad:  # a frozen reader's are not
            lr = o.lr * (reader_lr if name.startswith("reader.") else 1.0)
            # no weight decay on biases and norm scales
            groups.setdefault((lr, o.weight_decay if p.ndim > 1 else 0.0), []).append(p)
    groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in
              sorted(groups.items(), key=lambda g: (-g[0][0], -g[0][1]))]
    if o.name == "adamw":
        # One fused kernel for the whole update (CPU and CUDA, torch >= 2.4): measurably faster per step.
        opt = torch.optim.AdamW(groups, lr=o.lr, fused=True)
    else:
        # fused too: like fused AdamW it honours optimizer.found_inf, the loop's on-device guard against NaN.
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True, fused=True)
    total = max(1, cfg.trainer.epochs * steps_per_epoch)
    warmup = int(o.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_sizes(cfg: Config, per_epoch: int, world: int = 1) -> None:
    if per_epoch < cfg.trainer.batch_size:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the {per_epoch} training "
                        f"samples per epoch; lower trainer.batch_size or raise data.limit.")
    if cfg.trainer.batch_size % world:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must divide evenly "
                        f"among {world} processes; make it a multiple of {world}.")


def from_checkpoint(state: dict, path, device: torch.device | str = "cpu"):
    """(config, model in eval mode, task) of a loaded checkpoint; a sentence if any of it does not fit."""
    values, items = checkpoint.entry(state, "config", dict, path), checkpoint.entry(state, "items", dict, path)
    try:
        cfg, fmt = from_dict(values), Format.from_dict(items)
    except (UserError, TypeError, ValueError) as exc:
        raise UserError(f"{path} carries a config or format this version refuses ({str(exc).rstrip('.')}); use a "
                        f"checkpoint written by this version of cnnrnn.") from None
    net = model(cfg, fmt)
    weights = checkpoint.entry(state, "model", dict, path)
    broken = next((k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()
                   and not torch.isfinite(v).all()), None)
    if broken is not None:  # every score would be NaN: say so once instead of printing NaN for every input
        raise UserError(f"{path} holds NaN or infinite weights ({broken}), so every prediction would be NaN; use "
                        f"an earlier checkpoint of that run, e.g. its best.pt.")
    expected = net.state_dict()
    retyped = next((k for k, v in weights.items() if k in expected and torch.is_tensor(v)
                    and v.dtype != expected[k].dtype), None)
    if retyped is not None:  # load_state_dict would cast them silently: integer weights predict one flat score
        raise UserError(f"{path} holds {retyped} as {weights[retyped].dtype}, where the model keeps "
                        f"{expected[retyped].dtype}; the file was altered or made elsewhere.")
    try:
        net.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = str(exc).splitlines()
        reason = (lines[1] if len(lines) > 1 else lines[0] if lines else type(exc).__name__).strip()
        raise UserError(f"{path} holds weights that do not fit a {MODEL_OF[cfg.task]} model of task={cfg.task} "
                        f"({reason}); it comes from another model family or version.") from None
    # channels_last as in training: the convolutions then sum in the same order, so evaluate reproduces the
    # run's numbers exactly (under bf16 the other layout moves test/map and test/loss)
    net = net.to(device, memory_format=torch.channels_last).eval()
    task_state = checkpoint.entry(state, "task_state", dict, path, default={})
    return cfg, net, make_task(cfg, fmt, state=task_state)


def reader_model(path, device: torch.device | str = "cpu", what: str = "model.init_from",
                 split: Config | None = None) -> SmallCNN:
    """A per-item reader (a single-label cnn: task=reader or cnn) from a checkpoint, or a sentence why it cannot
    serve as one (`what` names the setting that gave the path); with `split`, a run's config, one trained on that
    run's split of the items, so that none of its training items is a validation item of the run."""
    cfg, net, _ = from_checkpoint(checkpoint.load(path), path, device)
    if not isinstance(net, SmallCNN):
        raise UserError(f"{what}={path} holds a task={cfg.task} model, but a reader is a single-label cnn; give the "
                        f"checkpoints/best.pt of a task=reader (or task=cnn) run.")
    mine, its = split and split_of(split.data), split_of(cfg.data)
    if mine and mine[:2] == its[:2] and mine != its:  # the same items split otherwise (other data is welcome)
        raise UserError(f"{what}={path} was trained on another split of the items (data.val_size={its[2]}, "
                        f"data.seed={its[3]}; this run: {mine[2]}, {mine[3]}), so some of its training items are this "
                        f"run's validation items; give a reader of this split, or set the same split.")
    return net


def split_of(d) -> tuple:
    """What fixes which items are training and which validation items."""
    return d.source, d.path and str(Path(d.path).resolve()), d.val_size, d.seed  # data.root: the same items


def init_encoder(net: nn.Module, reader: SmallCNN, path) -> None:
    """Copy a reader (read from `path`) into a composite model's reader, exactly, but for its head where the classes
    are other ones (a reader of other data: the head stays as initialised); a sentence if its shape differs."""
    own = net.reader.state_dict()
    weights = {k: v for k, v in reader.state_dict().items()
               if not k.startswith("head.") or k in own and own[k].shape == v.shape}
    try:
        net.reader.load_state_dict({**own, **weights})
    except RuntimeError:
        raise UserError(f"model.init_from={path} is a reader of another shape than this model's; train it with the "
                        f"same model.channels, model.convs and hidden = model.cell_dim.") from None


def probe(cfg: Config, task: Task) -> None:
    """Build the model and its optimizer and run a blank batch through the task's loss, so that sizes or settings
    torch rejects are one sentence before any work, not a traceback after the data is read."""
    try:
        with warnings.catch_warnings():  # a zero-element layer warns first, then fails below
            warnings.simplefilter("ignore")
            net = model(cfg, task.fmt)
        optimizer(cfg, net, 1)
        with torch.no_grad():
            task.loss(net.eval(), task.blank_batch(cfg))
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
        reason = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise UserError(f"The model and optim settings of task={cfg.task} make a model that torch rejects "
                        f"({reason}); compare them with `python -m cnnrnn.train task={cfg.task} --cfg job`.") from None


def preflight(cfg: Config) -> None:
    """Check the model and every file a run will read (scene, model.init_from) before any work."""
    from cnnrnn.ranks import pick_device

    pick_device(cfg.trainer.device)  # a GPU asked for where there is none: before the reader stage's folder
    task = make_task(cfg, sources.preview(cfg.data))
    probe(cfg, task)
    task.scene_spec(cfg)
    if cfg.model.get("init_from"):
        init_encoder(model(cfg, task.fmt), reader_model(cfg.model["init_from"], split=cfg), cfg.model["init_from"])

