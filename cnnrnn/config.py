"""The run configuration, the one place defaults live: typed dataclasses whose defaults are the main job's recipe,
the task presets as the keys that differ from them, and validation. No Hydra here: the shell composes command
lines into the dict that `from_dict` checks, and a notebook builds a run with `preset("cnn", ...)`."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cnnrnn.data.composite import MAX_GRID
from cnnrnn.errors import UserError
from cnnrnn.models import MODELS, model_keys

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MAX_SEED = 2**31 - 1
# Bounds on what scales a run's memory or time: beyond them a value asks for gigabytes or weeks and fails late.
MAX_EPOCHS, MAX_BATCH, MAX_PICTURES = 10_000, 65_536, 10_000_000


@dataclass
class Trainer:
    epochs: int = 15
    batch_size: int = 128
    device: str = "auto"                   # auto | cpu | cuda (auto: CUDA when present)
    threads: int | None = None             # torch intra-op threads; null = every core, or this process's share of them
    amp: bool | None = None                # bf16 autocast; null = where the hardware computes bf16 natively (a CUDA
                                           # GPU, a CPU with AVX512-BF16 or AMX), fp32 elsewhere (docs/speed.md)
    ema: float | None = 0.999              # evaluate and save an exponential moving average of the weights; null = off
    ckpt_every: int = 0                    # also write last.pt every N steps (0: at epoch ends only)
    log_every: int = 10                    # the step losses reach the host every N steps (TensorBoard, bar, stop
                                           # signals, NaN check); in between, steps queue without waiting
    progress: bool = True                  # progress bars


@dataclass
class Optim:
    name: str = "adamw"                    # adamw | sgd (Nesterov)
    lr: float = 1e-3
    weight_decay: float = 0.05             # on weights only, not on biases and norm scales
    momentum: float = 0.9                  # sgd only
    warmup_epochs: float = 0.0             # linear warm-up, then cosine decay to 0, per step
    grad_clip: float | None = None
    label_smoothing: float = 0.1           # of the cross-entropy (softmax tasks) or of the BCE targets
    reader_lr: float = 0.0                 # the reader's rate as a share of optim.lr; 0 freezes it and computes every
                                           # item's features once (fine-tuning at 0.1 scored lower: docs/recipes.md)


@dataclass
class Data:
    source: str = "fashion_mnist"          # fashion_mnist | folder (class folders) | csv (files and labels)
    path: str | None = None                # the folder or the CSV file of a user's pictures (docs/your-data.md)
    root: str = "data/"                    # where Fashion-MNIST's files are, or go
    kind: str = "auto"                     # a CSV's rows: auto (pictures if a row has 2+ labels) | items | pictures
    label_sep: str = " "                   # between the labels of a CSV row
    size: int = 28                         # a user's items: pictures made size x size (aspect kept, background padded);
                                           # for multi-label pictures, the side of the windows the reader slides
    picture_size: int = 64                 # the side of multi-label pictures: a CSV's, made this size, or the canvas of
                                           # data.layout=scatter
    layout: str = "grid"                   # composites: items in the cells of a grid, or scattered (free positions)
    clutter: int = 0                       # scattered composites: fragments of other items per item, as clutter
    channels: int = 1                      # 1 (gray) or 3 (RGB)
    skip_bad: bool = False                 # skip files Pillow cannot read (counted in one warning) instead of stopping
    cache: str | None = "runs/cache"       # where a user's pictures are kept once decoded, reused by every run on the
                                           # same files, conversion and split; null = decode every time
    limit: int | None = None               # use only the first N training items
    val_size: typing.Any = None            # held out of the training items, stratified: a count or a share; null =
                                           # 5,000 for Fashion-MNIST, else 10% (at least one per class, at most 5,000)
    seed: int = 0                          # fixes the validation split and the val/test composites for every run
    train_eval_size: int = 5000            # fixed training items scored each epoch, for train curves comparable to val
    augment: bool = True                   # train-time changes of every item (val/test never): the keys below
    hflip: float | None = None             # probability of a horizontal flip; null = 0.5 where a mirrored item keeps
                                           # its class (Fashion-MNIST), else 0 (a mirrored digit is another class)
    shift: int = 0                         # pixels of random shift (crop with padding), inside the item's cell
    grid: typing.Any = 2                   # composites: grid x grid cells of 28x28; a list, e.g. [2,3], mixes sizes
    eval_grid: int | None = None           # validation/test grid; null = data.grid (the largest of a list)
    repeats: float = 0.0                   # probability that an item takes the class of an earlier item (counting)
    min_items: int = 1
    max_items: int = 4
    test_size: int = 10000                 # composites drawn for test
    val_composites: int | None = None      # drawn for validation; null = the validation items (a user's data: >= 2,000)
    epoch_size: int | None = None          # training samples per epoch; null = the training items (a user's data:
                                           # at least 20,000)
    scene: str = "uniform"                 # which items go together: uniform, or a scene file (configs/scene/NAME.yaml)
    degrade: float = 0.0                   # blur, noise and occlusion of every item, train and test; 0 = off

    @property
    def grids(self) -> tuple[int, ...]:
        """The training grid sizes (one, or several mixed across steps)."""
        return tuple(self.grid) if isinstance(self.grid, (list, tuple)) else (self.grid,)

    @property
    def test_grid(self) -> int:
        """The grid of the validation and test composites."""
        return self.eval_grid or max(self.grids)


@dataclass
class Reader:
    """The composite models' first stage: the per-item reader, trained on single items (task=reader), cached."""
    train: bool = True                     # without model.init_from: train the reader first and start from it; false:
                                           # the whole model from scratch, and no tile oracle
    epochs: int | None = None              # its epochs; null = task=reader's
    cache: str | None = "runs/readers"     # where readers are kept, reused by every run with the same recipe and
                                           # items; null = RUN_DIR/reader


@dataclass
class Eval:
    tta: bool | None = None                # test-time flips: each image's predictions averaged with its mirror
                                           # image's; null = where a mirrored item keeps its class (Fashion-MNIST)


@dataclass
class Config:
    task: str = "multilabel"
    seed: int = 0
    resume: str | None = None              # a run dir to continue from its checkpoints/last.pt
    trainer: Trainer = field(default_factory=Trainer)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    model: dict = field(default_factory=lambda: model_keys("cnn_rnn"))  # the model's constructor arguments
    reader: Reader = field(default_factory=Reader)
    eval: Eval = field(default_factory=Eval)

    def to_dict(self) -> dict:
        """Plain data; a single-label task's dict leaves out the keys only composite tasks have."""
        values = dataclasses.asdict(self)
        if MODELS[MODEL_OF[self.task]].kind == "single":
            for key in COMPOSITE_ONLY:
                group, _, leaf = key.rpartition(".")
                (values[group] if group else values).pop(leaf)
        return values


# Each task's model (the registry's name) and the keys that differ from the defaults above (the main job's
# recipe: AdamW with cosine decay, label smoothing, weight decay, an EMA of the weights, flips; chosen on
# validation, docs/recipes.md).
MODEL_OF = {"lstm": "lstm", "lstm2": "lstm", "cnn": "cnn", "reader": "cnn", "multilabel": "cnn_rnn",
            "multilabel_bce": "cnn_bce"}
PRESETS: dict[str, dict] = {
    # The write-up's LSTM: augmentation lowered its validation accuracy; clipping keeps its early steps stable.
    "lstm": {"model": {"dropout": 0.2}, "trainer": {"epochs": 30}, "optim": {"lr": 2e-3, "grad_clip": 1.0},
             "data": {"augment": False}, "eval": {"tta": False}},
    # Two stacked layers of 512 memorise the training set by epoch 20 without more dropout and weight decay.
    "lstm2": {"model": {"hidden": 512, "layers": 2, "dropout": 0.4}, "trainer": {"epochs": 25},
              "optim": {"weight_decay": 0.1, "grad_clip": 1.0}, "data": {"augment": False}, "eval": {"tta": False}},
    # The write-up's CNN: conv32-pool-conv64-pool-dense128.
    "cnn": {"trainer": {"epochs": 40}, "eval": {"tta": False}},
    # The per-item reader of the composite models: two convs per stage and a dense layer of 256, random shifts
    # (crop with padding 2), a warm-up, a higher rate at batch 256; the recipe that won on validation within 15
    # minutes of two CPU cores (docs/recipes.md).
    "reader": {"model": {"convs": 2, "hidden": 256}, "trainer": {"epochs": 30, "batch_size": 256},
               "optim": {"lr": 4e-3, "warmup_epochs": 1.0}, "data": {"shift": 2}},
    "multilabel": {},
    # The BCE head on the same reader: its max over the cells needs the reader fine-tuned (frozen, it scored 1.4
    # points lower on validation), and three epochs of that are enough.
    "multilabel_bce": {"trainer": {"epochs": 3}, "optim": {"label_smoothing": 0.0, "reader_lr": 1.0}},
}
# Keys that mean something only for composites: a single-label task has none of them.
COMPOSITE_ONLY = ("reader", "optim.reader_lr", "data.grid", "data.eval_grid", "data.repeats", "data.min_items",
                  "data.max_items", "data.test_size", "data.val_composites", "data.scene", "data.picture_size",
                  "data.layout", "data.clutter")


def preset_dict(task: str) -> dict:
    """The full config of a task preset as plain data: the defaults, its model's defaults, its differences."""
    if task not in PRESETS:
        raise UserError(f"Unknown task '{task}'{_suggest(task, PRESETS)}; choose one of {', '.join(PRESETS)}.")
    values = Config(task=task).to_dict()
    changes = copy.deepcopy(PRESETS[task])
    values["model"] = {**model_keys(MODEL_OF[task]), **changes.pop("model", {})}
    for group, keys in changes.items():
        values[group].update(keys)
    return values


def preset(task: str, **groups) -> Config:
    """A validated Config of a task preset with changes, e.g. preset("cnn", trainer={"epochs": 2})."""
    values = preset_dict(task)
    for group, keys in groups.items():
        if isinstance(values.get(group), dict) and isinstance(keys, dict):
            values[group].update(keys)
        else:
            values[group] = keys
    return from_dict(values)


def known_keys(task: str) -> set[str]:
    """Every dotted key a command line may set for this task (its model's own keys included)."""
    def walk(node: dict, prefix: str) -> set[str]:
        keys = {prefix.rstrip(".")} if prefix else set()
        for k, v in node.items():
            keys |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return keys
    return walk(preset_dict(task), "")


def check_key(key: str, task: str) -> None:
    """One sentence for a key the task's config does not have, with the closest one."""
    task = task if task in PRESETS else "multilabel"
    known = known_keys(task)
    if key in known:
        return
    if key in known_keys("multilabel") and key.startswith(COMPOSITE_ONLY):
        raise UserError(f"{key} is a setting of the composite tasks (multilabel, multilabel_bce); task={task} reads "
                        f"single items, so drop it.")
    parent, _, leaf = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    hint = _suggest(leaf, siblings, parent + "." if parent else "") if siblings else _suggest(key, sorted(known))
    raise UserError(f"Unknown config key '{key}'{hint}; `python -m cnnrnn.train task={task} --cfg job` lists every "
                    f"key.")


def _suggest(key: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _coerce(value, annotation, where: str):
    """Check value against a field type; ints are accepted where floats are expected."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is typing.Any:
        return list(value) if isinstance(value, tuple) else value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation in (int, float) and isinstance(value, bool) or not isinstance(value, annotation):
        raise UserError(f"{where}={value!r} must be of type {annotation.__name__}; "
                        f"write it as in `python -m cnnrnn.train --cfg job`.")
    if annotation is float and not math.isfinite(value):  # inf passes every `> 0` below, nan fails all silently
        raise UserError(f"{where}={value} must be a finite number.")
    return value


def _build(cls, values: dict, prefix: str, task: str = ""):
    hints = typing.get_type_hints(cls)  # the fields' types
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise UserError(f"Unknown config key '{where}'{_suggest(key, hints)}; "
                            f"`python -m cnnrnn.train --cfg job` lists every key.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) or hint is dict:
            if not isinstance(value, dict):
                raise UserError(f"{where} is a group of keys, not a value; set {where}.KEY=VALUE instead.")
            # the model group: the task's model's defaults completed by what is given
            kwargs[key] = _build(hint, value, f"{where}.") if hint is not dict else {
                **model_keys(MODEL_OF[task]), **value}
        else:
            kwargs[key] = _coerce(value, hint, where)
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> Config:
    """Refuse invalid values with one sentence that names the key and the fix."""
    t, o, d = cfg.trainer, cfg.optim, cfg.data
    for key, seed in (("seed", cfg.seed), ("data.seed", d.seed)):  # numpy takes seeds below 2**32; offsets are added
        _require(0 <= seed <= MAX_SEED, f"{key}={seed} must be between 0 and {MAX_SEED}.")
    _require(1 <= t.epochs <= MAX_EPOCHS, f"trainer.epochs={t.epochs} must be from 1 to {MAX_EPOCHS:,}.")
    _require(1 <= t.batch_size <= MAX_BATCH, f"trainer.batch_size={t.batch_size} must be from 1 to {MAX_BATCH:,}.")
    _require(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r} must be auto, cpu or cuda.")
    _require(t.threads is None or t.threads >= 1, f"trainer.threads={t.threads} must be at least 1 or null.")
    _require(t.ema is None or 0 < t.ema < 1, f"trainer.ema={t.ema} must be a decay in (0, 1) or null.")
    _require(t.ckpt_every >= 0, f"trainer.ckpt_every={t.ckpt_every} must be 0 (off) or a number of steps.")
    _require(t.log_every >= 1, f"trainer.log_every={t.log_every} must be a number of steps, at least 1.")
    _require(o.name in ("adamw", "sgd"), f"optim.name={o.name!r} must be adamw or sgd.")
    _require(o.lr > 0, f"optim.lr={o.lr} must be greater than 0.")
    _require(0 <= o.momentum < 1 and (o.momentum > 0 or o.name != "sgd"), f"optim.momentum={o.momentum} must be "
             f"in (0, 1) (sgd uses Nesterov momentum), e.g. 0.9.")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be 0 or more.")
    _require(0 <= o.warmup_epochs <= t.epochs, f"optim.warmup_epochs={o.warmup_epochs} must be between 0 and "
             f"trainer.epochs.")
    _require(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be positive or null.")
    _require(0 <= o.label_smoothing < 1, f"optim.label_smoothing={o.label_smoothing} must be in [0, 1).")
    _require(0 <= o.reader_lr <= 1, f"optim.reader_lr={o.reader_lr} must be a share of optim.lr in [0, 1].")
    validate_data(d)
    _require(d.limit is None or d.limit >= 1, f"data.limit={d.limit} must be at least 1 or null.")
    _require(d.train_eval_size >= 0, f"data.train_eval_size={d.train_eval_size} must be 0 or more.")
    _require(d.hflip is None or 0 <= d.hflip <= 1, f"data.hflip={d.hflip} is a probability in [0, 1], or null.")
    _require(d.epoch_size is None or 1 <= d.epoch_size <= MAX_PICTURES, f"data.epoch_size={d.epoch_size} must be "
             f"from 1 to {MAX_PICTURES:,}, or null.")
    _require(0 <= d.shift <= 8, f"data.shift={d.shift} must be between 0 and 8 pixels.")
    _require(0 <= d.degrade <= 1, f"data.degrade={d.degrade} must be a strength in [0, 1] (0 = off).")
    if MODELS[MODEL_OF[cfg.task]].kind != "single":
        validate_composites(cfg)
    MODELS[MODEL_OF[cfg.task]].check(cfg.model)
    return cfg


def validate_data(d: Data) -> None:
    """Where the items come from and what they are made."""
    _require(d.source in ("fashion_mnist", "folder", "csv"), f"data.source={d.source!r} must be fashion_mnist, "
             f"folder or csv.")
    if d.source == "fashion_mnist":
        _require(d.path is None, f"data.path={d.path} is for data.source=folder or csv; add data.source=folder (a "
                 f"folder of class folders) or data.source=csv.")
        _require((d.size, d.channels) == (28, 1), "Fashion-MNIST items are 28x28 gray: data.size and data.channels "
                 "are for a user's pictures (data.source=folder or csv).")
    else:
        _require(bool(d.path), f"data.source={d.source} needs data.path, the {d.source} of your pictures.")
    _require(d.kind in ("auto", "items", "pictures"), f"data.kind={d.kind!r} must be auto, items or pictures.")
    _require(8 <= d.size <= 256, f"data.size={d.size} must be from 8 to 256 pixels.")
    _require(d.channels in (1, 3), f"data.channels={d.channels} must be 1 (gray) or 3 (RGB).")
    _require(d.size <= d.picture_size <= 512, f"data.picture_size={d.picture_size} must be from data.size "
             f"({d.size}) to 512 pixels.")
    v = d.val_size
    _require(v is None or isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_PICTURES or
             isinstance(v, float) and 0 < v < 1, f"data.val_size={v!r} must be a count (at least 1), a share in "
             f"(0, 1), or null.")


def validate_composites(cfg: Config) -> None:
    d = cfg.data
    _require(d.layout in ("grid", "scatter"), f"data.layout={d.layout!r} must be grid or scatter.")
    _require(0 <= d.clutter <= 8, f"data.clutter={d.clutter} must be from 0 to 8 fragments per item.")
    _require(1 <= d.min_items, f"data.min_items={d.min_items} must be at least 1.")
    _require(d.min_items <= d.max_items, f"data.min_items={d.min_items} is larger than data.max_items="
             f"{d.max_items}; make min_items <= max_items.")
    if d.layout == "scatter":
        room = ((d.picture_size - d.size) // (d.size // 2) + 1) ** 2 // 2  # items that fit, a quarter overlapping
        _require(d.max_items <= room, f"data.max_items={d.max_items} items do not fit on a {d.picture_size}x"
                 f"{d.picture_size} canvas without overlapping more than a quarter; at most {room}.")
        _require(d.scene == "uniform" and not d.degrade and cfg.model.get("encoder") != "cells", "data.layout=scatter "
                 "draws uniform items, not degraded ones, for the picture encoder: drop data.scene, data.degrade and "
                 "model.encoder=cells.")
    else:
        validate_grids(d)
    _require(0 <= d.repeats <= 1, f"data.repeats={d.repeats} must be a probability in [0, 1] (0 = off).")
    for key, value in (("data.test_size", d.test_size), ("data.val_composites", d.val_composites or 1)):
        _require(1 <= value <= MAX_PICTURES, f"{key}={value} must be from 1 to {MAX_PICTURES:,} composites.")
    _require(bool(d.scene), "data.scene must name a scene: uniform, or a file under configs/scene/.")
    _require(cfg.reader.epochs is None or 1 <= cfg.reader.epochs <= MAX_EPOCHS, f"reader.epochs={cfg.reader.epochs} "
             f"must be from 1 to {MAX_EPOCHS:,}, or null.")


def validate_grids(d: Data) -> None:
    grids = d.grids
    _require(bool(grids) and all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= MAX_GRID for g in grids),
             f"data.grid={d.grid!r} must be a grid size from 1 to {MAX_GRID}, or a list of them (e.g. [2,3]).")
    _require(d.eval_grid is None or 1 <= d.eval_grid <= MAX_GRID, f"data.eval_grid={d.eval_grid} must be from 1 to "
             f"{MAX_GRID}, or null.")
    g = max(grids)  # with mixed grids, a smaller grid's composites hold at most its number of cells
    _require(d.max_items <= g ** 2, f"data.max_items={d.max_items} is more items than the "
             f"{g}x{g} grid has cells; lower it or raise data.grid.")
    _require(d.min_items <= min(grids) ** 2, f"data.min_items={d.min_items} is more items than the "
             f"{min(grids)}x{min(grids)} grid has cells; lower it or drop that grid from data.grid.")


def from_dict(values: dict) -> Config:
    """A validated Config from a plain (resolved) dict; UserError names the first bad key."""
    if not isinstance(values, dict):
        raise UserError(f"A config must be a mapping of keys, not {type(values).__name__}.")
    task = values.get("task", Config.task)
    _require(task in PRESETS, f"Unknown task '{task}'{_suggest(str(task), PRESETS)}; choose one of "
             f"{', '.join(PRESETS)}.")
    return validate(_build(Config, values, "", task))
