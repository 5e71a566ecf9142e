"""Objects from a validated Config: data sources, task, model, optimizer and schedule. No Hydra here."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from cnnrnn.config import CONFIG_DIR, Config
from cnnrnn.data.augment import Augment
from cnnrnn.data.composite import CompositeSource, MixedGridSource
from cnnrnn.data.fashion_mnist import CLASSES, Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.data.scene import Scene, read_scene
from cnnrnn.errors import UserError
from cnnrnn.models import build_model
from cnnrnn.tasks import Classification, LabelSequence, MultiLabelBCE

# model.* keys that configure the task (training targets) or the start (initial weights), not the module
NOT_MODULE_KEYS = ("label_order", "init_from")


@dataclass
class Sources:
    train: object       # drawn afresh (order, composites, augmentation) every epoch
    train_eval: object  # fixed training items/composites, scored each epoch for the train curves
    val: object
    test: object


def scene_spec(cfg: Config) -> dict | None:
    """The scene file's contents for data.scene (None: uniform); a sentence if it is missing or bad."""
    return read_scene(cfg.data.scene, CONFIG_DIR / "scene")


def scene(cfg: Config, spec: dict | None = None) -> Scene | None:
    """The Scene of data.scene (None: uniform); `spec` is the one a checkpoint carries, used as it was."""
    spec = scene_spec(cfg) if spec is None else spec
    return None if spec is None else Scene(spec, cfg.data.scene)


def sources(cfg: Config, data: dict[str, Split], scene_spec: dict | None = None,
            device: torch.device | str | None = None) -> Sources:
    """The four sources; with `device`, every split's items and labels are put there once, and all batches
    (gathers, composites, augmentation) are made there: nothing is copied per batch but the batch's indices."""
    d = cfg.data
    if device is not None:
        data = {name: split.to(device) for name, split in data.items()}
    augment = Augment(d.hflip, d.shift, d.erase, d.rotate, d.scale, d.contrast) if d.augment else None
    n_eval = min(d.train_eval_size, len(data["train"]))
    if cfg.kind == "single":
        deg = dict(degrade=d.degrade)
        return Sources(ItemSource(data["train"], cfg.seed, augment, fixed=False, **deg),
                       ItemSource(data["train"].subset(torch.arange(n_eval)), d.seed + 3, **deg),
                       ItemSource(data["val"], d.seed + 1, **deg), ItemSource(data["test"], d.seed + 2, **deg))
    sc = scene(cfg, scene_spec)

    def composites(split: Split, size: int, grid: int, **kwargs) -> CompositeSource:
        # with mixed grids, a smaller grid holds at most one item per cell
        return CompositeSource(split, size, grid=grid, min_items=d.min_items, max_items=min(d.max_items, grid ** 2),
                               degrade=d.degrade, scene=sc, repeats=d.repeats, **kwargs)

    n_train, test_grid = d.epoch_size or len(data["train"]), d.test_grid
    train = [composites(data["train"], n_train, g, seed=cfg.seed, augment=augment) for g in d.grids]
    # Fixed composites are seeded by data.seed only: identical across runs, seeds and models.
    return Sources(
        train[0] if len(train) == 1 else MixedGridSource(train, cfg.trainer.batch_size, cfg.seed),
        composites(data["train"], n_eval, test_grid, seed=d.seed + 3, fixed=True),
        composites(data["val"], d.val_size, test_grid, seed=d.seed + 1, fixed=True),
        composites(data["test"], d.test_size, test_grid, seed=d.seed + 2, fixed=True),
    )


def task(cfg: Config, train_labels: torch.Tensor | None = None, state: dict | None = None):
    """The task object; `state` restores what a checkpoint saved (a tuned threshold, the training class counts)."""
    state, tta = state or {}, cfg.eval.tta
    if cfg.kind == "single":
        return Classification(CLASSES, cfg.optim.label_smoothing, tta)
    if cfg.kind == "bce":
        return MultiLabelBCE(CLASSES, state.get("threshold", 0.5), tta)
    counts = state.get("class_counts")
    if train_labels is not None:
        counts = torch.bincount(train_labels, minlength=len(CLASSES))
    return LabelSequence(CLASSES, cfg.model["label_order"], counts, max_labels=max(cfg.data.grids) ** 2,
                         label_smoothing=cfg.optim.label_smoothing, tta=tta, target=cfg.model.get("target", "set"))


def model(cfg: Config) -> nn.Module:
    kwargs = {k: v for k, v in cfg.model.items() if k != "name" and k not in NOT_MODULE_KEYS}
    if cfg.model["name"] == "cnn_rnn":
        # decoding stops at END or after one label per cell of the largest training grid (tasks.LabelSequence
        # passes each picture's own number of cells instead)
        kwargs["max_labels"] = max(cfg.data.grids) ** 2
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
        # fused too: like fused AdamW it honours optimizer.found_inf, the loop's on-device guard against NaN.
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=True, fused=True)
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
    weights = state.get("model") if isinstance(state.get("model"), dict) else {}
    broken = next((k for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()
                   and not torch.isfinite(v).all()), None)
    if broken is not None:  # every score would be NaN: say so once instead of printing NaN for every input
        raise UserError(f"{path} holds NaN or infinite weights ({broken}), so every prediction would be NaN; use "
                        f"an earlier checkpoint of that run, e.g. its best.pt.")
    try:
        net.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        reason = str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()
        raise UserError(f"{path} holds weights that do not fit a {cfg.model['name']} model of task={cfg.task} "
                        f"({reason}); it comes from another model family or version.") from None
    # channels_last as in training: the convolutions then sum in the same order, so evaluate reproduces the
    # run's numbers exactly (under bf16 the other layout moves test/map and test/loss)
    net = net.to(device, memory_format=torch.channels_last).eval()
    return cfg, net, task(cfg, state=state.get("task_state"))


def init_encoder(net: nn.Module, path) -> list[str]:
    """Copy a single-label cnn checkpoint's per-item stage into net's encoder (cnn_rnn or cnn_bce): all its
    conv and batch-norm tensors (same names and shapes: the same channels, convs and pool_first), and its
    first dense layer over the flattened (C, h, w) map into the cell conv where that has as many outputs (the
    cell conv is that dense layer applied to each cell). Returns the names copied; a sentence if the
    checkpoint is not a single-label cnn or its conv stack does not fit."""
    from cnnrnn.engine import load_checkpoint

    state = load_checkpoint(path)
    src_cfg, src, _ = from_checkpoint(state, path)
    if src_cfg.task != "cnn":
        raise UserError(f"model.init_from={path} holds a task={src_cfg.task} model, but the encoder starts only "
                        f"from a single-label cnn; give a task=cnn run's checkpoints/best.pt.")
    src_state, dst_state = src.state_dict(), net.state_dict()
    copied = {k: v for k, v in src_state.items() if k.startswith("encoder.") and k in dst_state
              and dst_state[k].shape == v.shape}
    dense = next(m for m in src.head if isinstance(m, nn.Linear))
    cell = [i for i, m in enumerate(net.encoder.layers) if isinstance(m, nn.Conv2d) and m.stride[0] > 1]
    if cell:
        key = f"encoder.layers.{cell[0]}.weight"
        if dense.weight.numel() == dst_state[key].numel() and dense.weight.shape[0] == dst_state[key].shape[0]:
            copied[key] = dense.weight.reshape(dst_state[key].shape)   # (hidden, C*h*w) -> (hidden, C, h, w)
    missing = [k for k in src_state if k.startswith("encoder.") and k not in copied]
    if missing:  # a partial stack would feed the copied layers from random ones: no transfer at all
        raise UserError(f"model.init_from={path} does not fit this encoder ({missing[0]} has no counterpart of its "
                        f"shape; the cnn has channels {list(src_cfg.model['channels'])}, {src_cfg.model['convs']} "
                        f"conv(s) per stage); train the cnn with the same model.channels, model.convs and "
                        f"model.pool_first.")
    net.load_state_dict({**dst_state, **copied})
    return sorted(copied)


def oracle_model(path, device: torch.device | str = "cpu") -> nn.Module:
    """The tile oracle's single-label cnn from a checkpoint, or a sentence why that checkpoint cannot serve."""
    from cnnrnn.engine import load_checkpoint

    cfg, net, _ = from_checkpoint(load_checkpoint(path), path, device)
    if cfg.task != "cnn":
        raise UserError(f"The tile oracle needs a checkpoint of task=cnn, but {path} holds task={cfg.task}; "
                        f"set oracle.ckpt to a cnn run's checkpoints/best.pt.")
    return net


def probe(cfg: Config) -> None:
    """Build the model and its optimizer and run two blank images through it, so that sizes or settings torch
    rejects are one sentence before any work, not a traceback after the data is read."""
    try:
        with warnings.catch_warnings():  # a zero-element layer warns first, then fails below
            warnings.simplefilter("ignore")
            net = model(cfg)
        optimizer(cfg, net, 1)
        side = 28 * (1 if cfg.kind == "single" else min(*cfg.data.grids, 2))  # the cell arithmetic, not the memory
        x = torch.zeros(2, 1, side, side)
        with torch.no_grad():
            net.eval()
            net(x, torch.zeros(2, 1, dtype=torch.long)) if cfg.kind == "sequence" else net(x)  # one decoder step
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
        reason = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise UserError(f"The model and optim settings of task={cfg.task} make a model that torch rejects "
                        f"({reason}); compare them with `python -m cnnrnn.train task={cfg.task} --cfg job`.") from None


def preflight(cfg: Config, only_oracle: bool = False) -> None:
    """Check the model and the files a run will read (scene, model.init_from, oracle.ckpt) before any work
    starts; `only_oracle` for a resumed run, whose other inputs were checked when it started."""
    if not only_oracle:
        probe(cfg)
        if cfg.kind != "single":
            scene(cfg)
        if cfg.model.get("init_from"):
            init_encoder(model(cfg), cfg.model["init_from"])
    if cfg.kind != "single" and cfg.oracle.ckpt:
        oracle_model(cfg.oracle.ckpt)
