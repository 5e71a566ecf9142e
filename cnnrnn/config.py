"""The run configuration as dataclasses, validated from a plain dict (Hydra stays in the entry points)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from cnnrnn.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

TASKS = {  # task -> (kind, model names it trains)
    "lstm": ("single", ("lstm",)),
    "lstm2": ("single", ("lstm",)),
    "cnn": ("single", ("cnn",)),
    "multilabel": ("sequence", ("cnn_rnn",)),
    "multilabel_bce": ("bce", ("cnn_bce",)),
    "multilabel_large": ("sequence", ("cnn_rnn",)),
}
MAX_SEED = 2**31 - 1
LABEL_ORDERS = ("frequency", "rare_first", "spatial", "random", "orderless")
TARGETS = ("set", "multiset")


@dataclass
class Trainer:
    epochs: int = 10
    batch_size: int = 128
    device: str = "auto"          # auto | cpu | cuda
    threads: typing.Optional[int] = None   # torch intra-op threads; null = torch's default
    amp: typing.Optional[bool] = None      # bf16 autocast; null = auto (on a CUDA GPU with native bf16)
    compile: bool = False         # torch.compile the model
    ema: typing.Optional[float] = None     # decay of an exponential moving average of the weights, evaluated
    ckpt_every: int = 0           # also write last.pt every N steps (0: at epoch ends only)
    log_every: int = 10           # losses reach the host (log, bar, stop check, NaN check) every N steps; 1 = each
    progress: bool = True         # a progress bar per epoch


@dataclass
class Optim:
    name: str = "adamw"           # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9         # sgd only
    schedule: str = "cosine"      # cosine | constant
    warmup_epochs: float = 0.0
    grad_clip: typing.Optional[float] = None
    label_smoothing: float = 0.0


@dataclass
class Data:
    root: str = "data/"
    limit: typing.Optional[int] = None     # use only the first N training items
    val_size: int = 5000
    seed: int = 0                 # fixes the validation split and the val/test composites for every run
    train_eval_size: int = 5000   # fixed training items scored each epoch, for train curves comparable to val
    augment: bool = False         # train-time augmentation of every item: flip, shift, erase, rotate, scale, contrast
    hflip: float = 0.5
    shift: int = 2
    erase: float = 0.0
    rotate: float = 0.0           # degrees, albumentations
    scale: float = 0.0            # fraction, albumentations
    contrast: float = 0.0         # brightness/contrast limit, albumentations
    grid: typing.Any = 2          # composites: grid x grid cells of 28x28; a list mixes sizes across training steps
    eval_grid: typing.Optional[int] = None  # validation/test grid; null = data.grid (the largest of a list)
    repeats: float = 0.0          # probability that an item takes the class of an earlier item of its composite
    min_items: int = 1
    max_items: int = 4
    test_size: int = 10000        # composites drawn for validation and for test
    epoch_size: typing.Optional[int] = None  # training composites per epoch; null = number of train items
    scene: str = "uniform"        # which items go together: uniform, or a scene file (configs/scene/NAME.yaml)
    degrade: float = 0.0          # corruption of every item (blur, noise, occlusion), train and test; 0 = off

    @property
    def grids(self) -> tuple[int, ...]:
        """The training grid sizes (one, or several mixed across steps)."""
        return tuple(self.grid) if isinstance(self.grid, (list, tuple)) else (self.grid,)

    @property
    def test_grid(self) -> int:
        """The grid of the validation and test composites."""
        return self.eval_grid or max(self.grids)


@dataclass
class Oracle:
    ckpt: typing.Optional[str] = None      # a single-label cnn checkpoint; null = train one on the fly
    epochs: typing.Optional[int] = None    # epochs of that on-the-fly cnn; null = task=cnn's default
    cache: typing.Optional[str] = None     # a folder where on-the-fly cnns are kept and reused; null = RUN/oracle


@dataclass
class Eval:
    tta: bool = False             # test-time flips: predictions of each image averaged with its mirror image's


@dataclass
class Config:
    task: str = "multilabel"
    seed: int = 0
    resume: typing.Optional[str] = None
    trainer: Trainer = field(default_factory=Trainer)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)
    model: dict = field(default_factory=dict)   # name + keyword arguments of build_model
    oracle: Oracle = field(default_factory=Oracle)
    eval: Eval = field(default_factory=Eval)

    @property
    def kind(self) -> str:
        return TASKS[self.task][0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


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


def _build(cls, values: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"Unknown config key '{where}'{_suggest(key, fields)}; "
                            f"`python -m cnnrnn.train --cfg job` lists every key.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{where} is a group of keys, not a value; set {where}.KEY=VALUE instead.")
            kwargs[key] = _build(hint, value, f"{where}.")
        elif hint is dict:
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _coerce(value, hint, where)
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> Config:
    """Refuse invalid values with one sentence that names the key and the fix."""
    t, o, d = cfg.trainer, cfg.optim, cfg.data
    _require(cfg.task in TASKS, f"Unknown task '{cfg.task}'{_suggest(cfg.task, TASKS)}; choose one of "
             f"{', '.join(TASKS)}.")
    for key, seed in (("seed", cfg.seed), ("data.seed", d.seed)):  # numpy takes seeds below 2**32; offsets are added
        _require(0 <= seed <= MAX_SEED, f"{key}={seed} must be between 0 and {MAX_SEED}.")
    _require(t.epochs >= 1, f"trainer.epochs={t.epochs} must be at least 1.")
    _require(t.batch_size >= 1, f"trainer.batch_size={t.batch_size} must be at least 1.")
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
    _require(o.schedule in ("cosine", "constant"), f"optim.schedule={o.schedule!r} must be cosine or constant.")
    _require(0 <= o.warmup_epochs <= t.epochs, f"optim.warmup_epochs={o.warmup_epochs} must be between 0 and "
             f"trainer.epochs.")
    _require(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip={o.grad_clip} must be positive or null.")
    _require(0 <= o.label_smoothing < 1, f"optim.label_smoothing={o.label_smoothing} must be in [0, 1).")
    _require(d.limit is None or d.limit >= 1, f"data.limit={d.limit} must be at least 1 or null.")
    _require(10 <= d.val_size <= 59990, f"data.val_size={d.val_size} must be between 10 and 59990 (Fashion-MNIST "
             f"has 60000 training images); set a smaller data.val_size.")
    _require(d.train_eval_size >= 0, f"data.train_eval_size={d.train_eval_size} must be 0 or more.")
    _require(0 <= d.hflip <= 1 and 0 <= d.erase <= 1, "data.hflip and data.erase are probabilities in [0, 1].")
    _require(0 <= d.shift <= 8, f"data.shift={d.shift} must be between 0 and 8 pixels.")
    _require(0 <= d.rotate <= 90, f"data.rotate={d.rotate} must be between 0 and 90 degrees.")
    _require(0 <= d.scale < 1, f"data.scale={d.scale} must be a fraction in [0, 1), e.g. 0.1.")
    _require(0 <= d.contrast < 1, f"data.contrast={d.contrast} must be a fraction in [0, 1), e.g. 0.2.")
    grids = d.grid if isinstance(d.grid, (list, tuple)) else [d.grid]
    _require(len(grids) >= 1 and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grids),
             f"data.grid={d.grid!r} must be a grid size of at least 1, or a list of them (e.g. [2,3]).")
    _require(d.eval_grid is None or d.eval_grid >= 1, f"data.eval_grid={d.eval_grid} must be at least 1 or null.")
    _require(1 <= d.min_items, f"data.min_items={d.min_items} must be at least 1.")
    _require(d.min_items <= d.max_items, f"data.min_items={d.min_items} is larger than data.max_items="
             f"{d.max_items}; make min_items <= max_items.")
    g = max(grids)  # with mixed grids, a smaller grid's composites hold at most its number of cells
    _require(d.max_items <= g ** 2, f"data.max_items={d.max_items} is more items than the "
             f"{g}x{g} grid has cells; lower it or raise data.grid.")
    _require(d.min_items <= min(grids) ** 2, f"data.min_items={d.min_items} is more items than the "
             f"{min(grids)}x{min(grids)} grid has cells; lower it or drop that grid from data.grid.")
    _require(0 <= d.repeats <= 1, f"data.repeats={d.repeats} must be a probability in [0, 1] (0 = off).")
    _require(d.test_size >= 1, f"data.test_size={d.test_size} must be at least 1.")
    _require(0 <= d.degrade <= 1, f"data.degrade={d.degrade} must be a strength in [0, 1] (0 = off).")
    _require(bool(d.scene), "data.scene must name a scene: uniform, or a file under configs/scene/.")
    _require(d.epoch_size is None or d.epoch_size >= 1, f"data.epoch_size={d.epoch_size} must be at least 1.")
    _require(cfg.oracle.epochs is None or cfg.oracle.epochs >= 1, f"oracle.epochs={cfg.oracle.epochs} must be at "
             f"least 1 or null.")
    name = cfg.model.get("name")
    allowed = TASKS[cfg.task][1]
    _require(name in allowed, f"model.name={name!r} cannot be trained by task={cfg.task} (it trains "
             f"{', '.join(allowed)}); drop the model override.")
    m = cfg.model
    _require(m.get("init_from") is None or isinstance(m["init_from"], str) and m["init_from"],
             f"model.init_from={m.get('init_from')!r} must be the path of a task=cnn checkpoint, or null.")
    if name == "cnn_rnn":
        _require(isinstance(m.get("beam_size"), int) and m["beam_size"] >= 1,
                 f"model.beam_size={m.get('beam_size')!r} must be an integer of at least 1.")
        _require(m.get("label_order") in LABEL_ORDERS, f"model.label_order={m.get('label_order')!r} must be "
                 f"one of {', '.join(LABEL_ORDERS)}.")
        _require(m.get("target", "set") in TARGETS, f"model.target={m.get('target')!r} must be set or multiset.")
    elif m.get("target", "set") != "set":
        _require(False, f"model.target={m['target']!r} needs the decoder (task=multilabel): the {name} model names "
                 f"sets only; drop model.target.")
    return cfg


def from_dict(values: dict) -> Config:
    """A validated Config from a plain (resolved) dict; UserError names the first bad key."""
    return validate(_build(Config, values, ""))
