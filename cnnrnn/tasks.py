"""What each kind of model is trained and judged on: its data, loss, predictions, label names, metrics, figures
and exported outputs. Single-label, BCE and the label decoder differ here and in their models, nowhere else.

A task turns a batch into a loss (`loss`), images alone into predictions (`predict`, also what an ONNX export
traces), predictions into label indices (`labels`, also for the outputs of an .onnx file), and the predictions
of a whole split into metrics (`metrics`). `Task` is the interface every caller relies on.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from cnnrnn import metrics, viz
from cnnrnn.config import CONFIG_DIR, MODEL_OF, Config
from cnnrnn.data import sources
from cnnrnn.data.items import Format
from cnnrnn.data.scene import Scene, read_scene
from cnnrnn.models import MODELS

MULTI_SCALARS = ("f1_micro", "f1_macro", "f1_samples", "cf1", "exact_match", "hamming_loss", "cardinality_acc",
                 "map", "loss")


class Task(Protocol):
    """What every kind of model has; the loop, evaluate, predict and export ask it and never probe it."""
    kind: str                   # single | bce | sequence | oracle
    fmt: Format                 # what its items are: class names, size, channels, normalisation
    classes: tuple[str, ...]
    select: str                 # the validation metric that chooses best.pt
    scalars: tuple[str, ...]    # the metrics logged each epoch and at test
    outputs: dict[str, str]     # the predictions an ONNX export names, with their shapes
    composite: bool             # reads pictures of 28x28 cells (any grid) and is scored beside the tile oracle
    tunes: bool                 # sets something on validation predictions after training (tune)
    multiset: bool              # names one label per item, so a class may repeat (counts)
    max_items: int | None       # the most labels it names (None: its own limit)
    takes_max_items: bool       # max_items can be set (the decoder)

    def side(self, cfg: Config) -> int: ...
    def scene_spec(self, cfg: Config) -> dict | None: ...
    def sources(self, cfg: Config, splits, scene_spec=None, device=None) -> sources.Sources: ...
    def blank_batch(self, cfg: Config, n: int = 2) -> dict[str, torch.Tensor]: ...
    def target(self, batch) -> torch.Tensor: ...
    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]: ...
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]: ...
    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]: ...
    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]: ...
    def tune(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict: ...
    def figures(self, out: dict[str, torch.Tensor], target: torch.Tensor, source, results: dict) -> dict: ...
    def state(self) -> dict: ...


def flip_average(scores: torch.Tensor, tta: bool, model: nn.Module, batch, x: torch.Tensor, to_scores) -> torch.Tensor:
    """`scores` of the model's input x, averaged with those of its mirror image when `tta` (test-time flips: a
    mirrored item keeps its class, and the set of items in a mirrored composite is the same). A frozen reader's
    cell features carry their mirror images' beside them ('feats_flip')."""
    if not tta:
        return scores
    return (scores + to_scores(model(batch["feats_flip"] if "feats" in batch else x.flip(-1)))) / 2


class Named:
    """What every task does with its Format: class names, the model's input, the picture side."""

    def __init__(self, fmt: Format):
        self.fmt, self.classes = fmt, fmt.classes

    def names(self, indices) -> list[str]:
        return [self.classes[int(i)] for i in indices]

    def inputs(self, batch) -> torch.Tensor:
        """The model's input: the pictures, or a frozen reader's cell features computed before (CellFeatures)."""
        return batch["feats"] if "feats" in batch else self.fmt.to_input(batch["image"])


class Classification(Named):
    """One label per image: cross-entropy, argmax, accuracy."""

    kind, select, scalars = "single", "acc", ("acc", "loss")
    composite = tunes = multiset = takes_max_items = False
    max_items = None
    outputs = {"logits": "(batch, classes) float: the model's logits for the image as given",
               "scores": "(batch, classes) float: softmax probabilities; the label is the argmax"}

    def __init__(self, fmt: Format, label_smoothing: float, tta: bool):
        super().__init__(fmt)
        self.label_smoothing, self.tta = label_smoothing, tta

    def side(self, cfg: Config) -> int:
        return self.fmt.size

    def scene_spec(self, cfg: Config) -> None:
        return None

    def sources(self, cfg: Config, splits, scene_spec=None, device=None) -> sources.Sources:
        return sources.items(cfg.data, cfg.seed, splits, self.fmt, device)

    def blank_batch(self, cfg: Config, n: int = 2) -> dict[str, torch.Tensor]:
        f = self.fmt
        return {"image": torch.zeros(n, f.channels, f.size, f.size, dtype=torch.uint8),
                "label": torch.zeros(n, dtype=torch.long)}

    def target(self, batch) -> torch.Tensor:
        return batch["label"]

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(self.inputs(batch))
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return loss, {"acc": (logits.argmax(1) == batch["label"]).float().mean()}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)
        logits = model(x).float()
        probs = flip_average(logits.softmax(dim=1), self.tta, model, batch, x, lambda z: z.float().softmax(dim=1))
        return {"logits": logits, "scores": probs}

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        return [[int(p)] for p in out["scores"].argmax(dim=1)]

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        return metrics.single_label(target.numpy(), out["scores"].argmax(dim=1).numpy(), self.classes)

    def tune(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict:
        return {}

    def figures(self, out: dict[str, torch.Tensor], target: torch.Tensor, source, results: dict) -> dict:
        pred = out["scores"].argmax(dim=1)
        wrong = (pred != target).nonzero().flatten()[:24]
        images = source.batch(source.order(None)[wrong])["image"].cpu()
        return {"test/confusion_matrix": viz.confusion_matrix(metrics.confusion(target.numpy(), pred.numpy(),
                                                                              len(self.classes)), self.classes),
                "test/misclassified": viz.labelled_grid(images, [self.names([t]) for t in target[wrong]],
                                                        [self.names([p]) for p in pred[wrong]])}

    def state(self) -> dict:
        return {}


class Composites(Named):
    """What the two multi-label tasks share: composite data, the multi-label metrics and figures."""

    select, composite, tunes, multiset, takes_max_items, max_items = "f1_samples", True, False, False, False, None

    def side(self, cfg: Config) -> int:
        """The side of its pictures: a user's multi-label pictures', the scattered canvas, or the grid's."""
        return self.fmt.picture or (cfg.data.picture_size if cfg.data.layout == "scatter" else
                                    self.fmt.size * cfg.data.test_grid)

    def scene_spec(self, cfg: Config) -> dict | None:
        """The scene file's contents for data.scene (None: uniform); a sentence if it is missing or bad."""
        return read_scene(cfg.data.scene, CONFIG_DIR / "scene", self.classes)

    def sources(self, cfg: Config, splits, scene_spec=None, device=None) -> sources.Sources:
        """`scene_spec`: the one a checkpoint carries, used as it was (None: read data.scene's file)."""
        if self.fmt.picture or cfg.data.layout == "scatter":
            return sources.pictures(cfg.data, cfg.seed, splits, self.fmt, device)
        spec = self.scene_spec(cfg) if scene_spec is None else scene_spec
        scene = None if spec is None else Scene(spec, cfg.data.scene, self.classes)
        return sources.composites(cfg.data, cfg.seed, cfg.trainer.batch_size, splits, self.fmt, scene, device)

    def blank_batch(self, cfg: Config, n: int = 2) -> dict[str, torch.Tensor]:
        """Empty pictures of the smallest training size: the arithmetic of the model, not its memory."""
        grid, f, c = min(cfg.data.grids), self.fmt, len(self.classes)
        side = self.side(cfg) if f.picture or cfg.data.layout == "scatter" else f.size * grid
        m = grid * grid if side == f.size * grid else cfg.data.max_items
        return {"image": torch.zeros(n, f.channels, side, side, dtype=torch.uint8), "cells": torch.full((n, m), -1),
                "boxes": torch.zeros(n, m, 2, dtype=torch.long), "labels": torch.zeros(n, c),
                "counts": torch.zeros(n, c)}

    def target(self, batch) -> torch.Tensor:
        return batch["labels"]

    def tune(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict:
        return {}

    def figures(self, out: dict[str, torch.Tensor], target: torch.Tensor, source, results: dict) -> dict:
        first = torch.arange(min(24, len(target)))
        images = source.batch(source.order(None)[first])["image"].cpu()
        pred = self.labels({k: v[first] for k, v in out.items()})
        # a class as often as the target counts it (once for a set; a multiset target repeats it)
        true = [self.names(c for c in row.nonzero().flatten().tolist() for _ in range(int(row[c])))
                for row in target[first]]
        per_class = {k[3:]: v for k, v in results.items() if k.startswith("f1/")}
        figs = {"test/composites": viz.labelled_grid(images, true, [self.names(p) for p in pred]),
                "test/f1_per_class": viz.per_class_bars(per_class, "test F1")}
        if "alpha" in out:
            n = min(6, len(target))
            figs["test/attention"] = viz.attention(images[:n], out["alpha"][:n], out["tokens"][:n], self.classes,
                                                   out["centers"][0], self.fmt.size)
        return figs


class MultiLabelBCE(Composites):
    """A set of labels per image from independent sigmoids; the threshold is tuned on validation data."""

    kind, scalars, tunes = "bce", MULTI_SCALARS, True
    outputs = {"scores": "(batch, classes) float: sigmoid probabilities; labels are the classes with score >= "
                         "threshold"}

    def __init__(self, fmt: Format, threshold: float, tta: bool, label_smoothing: float):
        super().__init__(fmt)
        self.threshold, self.tta, self.label_smoothing = threshold, tta, label_smoothing

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(self.inputs(batch))
        target = batch["labels"] * (1 - self.label_smoothing) + self.label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), target), {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        x = self.inputs(batch)
        return {"scores": flip_average(model(x).float().sigmoid(), self.tta, model, batch, x,
                                       lambda z: z.float().sigmoid())}

    def chosen(self, scores: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        return scores >= (self.threshold if threshold is None else threshold)

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in self.chosen(out["scores"])]

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        scores = out["scores"].numpy()
        result = metrics.multi_label(target.numpy(), self.chosen(out["scores"]).numpy(), self.classes, scores)
        half = metrics.multi_label(target.numpy(), self.chosen(out["scores"], 0.5).numpy(), self.classes)
        return {**result, **{f"{k}_at_0.5": half[k] for k in metrics.AT_HALF}}  # the untuned threshold too

    def tune(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict:
        """Set the threshold that maximises micro F1 on these (validation) predictions."""
        self.threshold = metrics.best_threshold(target.numpy(), out["scores"].numpy())
        return {"threshold": self.threshold}

    def state(self) -> dict:
        return {"threshold": self.threshold}


class LabelSequence(Composites):
    """A set of labels emitted one after another by a decoder, in a chosen training order.

    Orders: 'frequency' (most frequent training class first), 'rare_first', 'spatial' (reading order of
    the cells), 'random' (reshuffled every batch) and 'orderless' (at each step the target is the remaining
    true label the model ranks highest: predicted-label alignment, Yazici et al. 2020).

    target='multiset': one label per item (a class as often as it occurs, repeats next to each other except in
    the spatial order), scored with the multiset metrics beside the set ones. Decoding stops after as many
    labels as the picture has cells (any grid), or for pictures without cells after `steps` (the most labels of
    a training picture), or `max_items` when set.
    """

    kind, takes_max_items = "sequence", True
    scalars = (*MULTI_SCALARS, "grounding", "grounding_mass",
               "multiset_exact", "count_acc", "multiset_f1_micro", "multiset_f1_macro", "count_mae")
    outputs = {"tokens": "(batch, steps) int64: greedy decoding, class indices in emission order, then the END "
                         "index (the number of classes) to the end",
               "scores": "(batch, classes) float: each class's highest probability over the decoding steps"}

    def __init__(self, fmt: Format, order: str, class_counts, label_smoothing: float, tta: bool, target: str,
                 max_items: int | None = None, steps: int | None = None):
        super().__init__(fmt)
        classes, self.order, self.steps = fmt.classes, order, steps
        self.label_smoothing, self.tta = label_smoothing, tta
        self.multiset, self.max_items = target == "multiset", max_items
        counts = torch.as_tensor(class_counts if class_counts is not None else [1] * len(classes)).double()
        self.class_counts = counts.long().tolist()
        # Position of each class in the frequency order; ties go to the lower class index.
        by_frequency = sorted(range(len(classes)), key=lambda c: (-counts[c].item(), c))
        self.rank = torch.empty(len(classes)).index_put_((torch.tensor(by_frequency),),
                                                          torch.arange(len(classes), dtype=torch.float))

    def target(self, batch) -> torch.Tensor:
        return batch["counts"] if self.multiset else batch["labels"]

    def _keys(self, b: int, c: int, device) -> torch.Tensor:
        """(B, C) sort key of each class in the fixed orders but spatial (lower first)."""
        if self.order == "frequency":
            return self.rank.to(device).expand(b, c)
        if self.order == "rare_first":
            return -self.rank.to(device).expand(b, c)
        if self.order == "random":
            return torch.rand(b, c, device=device)
        raise ValueError(f"order {self.order!r} has no fixed sequence")

    def item_sequences(self, cells: torch.Tensor) -> torch.Tensor:
        """Multiset target tokens (B, G*G+1): one label per item in this task's order, END, -100 padding."""
        b, n_cells = cells.shape
        occupied = cells >= 0
        if self.order == "spatial":  # reading order of the cells
            key = torch.arange(n_cells, device=cells.device, dtype=torch.float).expand(b, -1)
        else:
            key = self._keys(b, len(self.classes), cells.device).gather(1, cells.clamp(min=0))  # (B, G*G)
        # items first, in key order; stable, so equal classes stay together in reading order
        order = key.masked_fill(~occupied, float("inf")).argsort(dim=1, stable=True)
        seq = F.pad(cells.gather(1, order), (0, 1))                                        # (B, G*G+1)
        n = occupied.sum(1, keepdim=True)
        t = torch.arange(n_cells + 1, device=cells.device).expand(b, -1)
        return torch.where(t < n, seq, -100).masked_fill(t == n, len(self.classes))

    def sequences(self, labels: torch.Tensor, cells: torch.Tensor | None) -> torch.Tensor:
        """Target tokens (B, M+1): the label set in this task's order, END, then -100 padding; M: the batch's
        cells or items (whatever the model was built for), or `steps` for pictures without them."""
        if self.multiset:
            return self.item_sequences(cells)
        b, c = labels.shape
        steps = self.steps if cells is None else cells.shape[1]
        present = labels.bool()
        if self.order == "spatial":
            # first cell (reading order) holding each class; cells (B, G*G) hold a class or -1
            pos = torch.arange(cells.shape[1], device=cells.device, dtype=torch.float).expand_as(cells)
            key = torch.full((b, c + 1), float("inf"), device=cells.device)
            key = key.scatter_reduce(1, torch.where(cells >= 0, cells, c), pos, reduce="amin")[:, :c]
        else:
            key = self._keys(b, c, labels.device)
        ordered = key.masked_fill(~present, float("inf")).argsort(dim=1)          # (B, C) present first
        n = present.sum(1, keepdim=True)                                           # (B, 1)
        t = torch.arange(steps + 1, device=labels.device).expand(b, -1)  # (B, T)
        seq = ordered[:, : steps + 1] if c >= steps + 1 else F.pad(ordered, (0, steps + 1 - c))
        seq = torch.where(t < n, seq, torch.full_like(seq, -100))
        return seq.masked_fill(t == n, c)  # END right after the last label

    def orderless_targets(self, model: nn.Module, x: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets where each step's target is the remaining true label the model ranks highest."""
        end = len(self.classes)
        # labels still to name: a count per class (multiset) or 0/1 (set)
        remaining = (batch["counts"] if self.multiset else batch["labels"]).long()
        ended = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        chosen = []

        def teacher(step: int, logits: torch.Tensor) -> torch.Tensor:
            nonlocal ended
            ranked = logits.detach()[:, :end].float().masked_fill(remaining == 0, float("-inf"))
            has = (remaining > 0).any(dim=1)
            target = torch.where(has, ranked.argmax(dim=1), end)
            remaining[has, target[has]] -= 1
            target = torch.where(ended, -100, target)
            ended = ended | ~has
            chosen.append(target)
            return target

        logits = model(x, teacher, steps=(batch["cells"].shape[1] if "cells" in batch else self.steps) + 1)
        return logits, torch.stack(chosen, dim=1)

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.inputs(batch)
        if self.order == "orderless":
            logits, targets = self.orderless_targets(model, x, batch)
        else:
            targets = self.sequences(batch["labels"], batch.get("cells"))
            logits = model(x, targets)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
        return loss, {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        # Only the image reaches the decoder, which feeds back its own outputs; the cells (where each true
        # class sits) are passed on beside the predictions for the grounding metric, never to the model.
        x = self.inputs(batch)
        if "feats_flip" in batch and self.tta:  # what read_cells(flip=True) computes from the pixels
            x = (x + batch["feats_flip"]) / 2
        out = model.generate(x, flip=self.tta and x.dim() == 4, max_labels=self.limit(x))
        pred = {"tokens": out["tokens"], "scores": out["scores"], "alpha": out["alpha"],
                "centers": model.centers(x).expand(len(x), -1, -1)}  # (B, L, 2) the positions' centres
        if "boxes" in batch:
            pred.update(cells=batch["cells"], boxes=batch["boxes"])
        return pred

    def limit(self, x: torch.Tensor) -> int:
        """Most labels to decode for pictures (B, C, H, W) or cell features (B, L, D): one per cell, or `steps` for
        pictures without cells, or max_items when set."""
        s = self.fmt.size
        cells = x.shape[1] if x.dim() == 3 else max(1, x.shape[-2] // s) * max(1, x.shape[-1] // s)
        cells = self.steps or cells
        return min(cells, self.max_items) if self.max_items else cells

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        end = len(self.classes)
        return [[int(t) for t in row if t < end] for row in out["tokens"]]  # in emission order

    def counts(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, C) labels emitted per class."""
        end = len(self.classes)
        return F.one_hot(out["tokens"].clamp(max=end), end + 1)[..., :end].sum(1)

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        present = target > 0  # the set of a multiset target
        counts = self.counts(out)
        result = metrics.multi_label(present.numpy(), (counts > 0).numpy(), self.classes, out["scores"].numpy())
        if "boxes" in out:
            result.update(metrics.grounding(out["tokens"], out["alpha"], out["cells"], out["boxes"], out["centers"],
                                            self.fmt.size, present))
        if self.multiset:
            result.update(metrics.multiset(target.numpy(), counts.numpy(), self.classes))
        return result

    def state(self) -> dict:
        # the training class counts fix the frequency order, so evaluate rebuilds the very same targets
        return {"order": self.order, "class_counts": self.class_counts, "steps": self.steps}


class TileOracle(Composites):
    """Reference for composites: a single-label model applied to each item's box (the cells of a grid, the boxes of
    scattered items), told where the items are (batch['boxes'], batch['cells']), its predictions joined into a set.
    Scored with the multi-label metrics."""

    kind, scalars = "oracle", MULTI_SCALARS

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        occupied = batch["cells"] >= 0                                   # (B, M)
        crops = box_crops(batch["image"], batch["boxes"], self.fmt.size)  # (B, M, C, S, S)
        probs = model(self.fmt.to_input(crops[occupied])).float().softmax(dim=1)  # (items, K)
        cell_probs = probs.new_zeros(*occupied.shape, len(self.classes))
        cell_probs[occupied] = probs                                     # (B, M, K), empty slots 0
        pred = torch.zeros_like(cell_probs, dtype=torch.bool)
        pred[occupied] = F.one_hot(probs.argmax(1), len(self.classes)).bool()
        return {"pred": pred.any(dim=1), "scores": cell_probs.amax(dim=1)}

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        return metrics.multi_label(target.numpy(), out["pred"].numpy(), self.classes, out["scores"].numpy())


def box_crops(images: torch.Tensor, corners: torch.Tensor, side: int) -> torch.Tensor:
    """The side x side boxes at top-left corners (B, M, 2) of pictures (B, C, H, W): (B, M, C, S, S)."""
    r = torch.arange(side, device=images.device)
    ys, xs = corners[..., 0, None] + r, corners[..., 1, None] + r               # (B, M, S)
    b = torch.arange(len(images), device=images.device)[:, None, None, None]
    out = images.permute(0, 2, 3, 1)[b, ys[..., :, None], xs[..., None, :]]     # (B, M, S, S, C)
    return out.permute(0, 1, 4, 2, 3).contiguous()                              # (B, M, C, S, S)


def make_task(cfg: Config, fmt: Format, train_labels: torch.Tensor | None = None, state: dict | None = None) -> Task:
    """The task of a config's model on items of `fmt`; `state` restores what a checkpoint saved (a tuned threshold,
    the training class counts, the decoder's steps), `train_labels` (class indices, or the label sets of pictures)
    gives the class counts of a new run's frequency order and a picture's most labels."""
    state, kind = state or {}, MODELS[MODEL_OF[cfg.task]].kind
    tta = cfg.eval.tta if cfg.eval.tta is not None else fmt.flips  # flips only where a mirror image keeps its class
    if kind == "single":
        return Classification(fmt, cfg.optim.label_smoothing, tta)
    if kind == "bce":
        return MultiLabelBCE(fmt, state.get("threshold", 0.5), tta, cfg.optim.label_smoothing)
    counts, steps = state.get("class_counts"), state.get("steps")
    if train_labels is not None and train_labels.dim() == 2:  # the label sets of pictures, no cells
        counts, steps = train_labels.sum(0).long(), max(1, int(train_labels.sum(1).max()))
    elif train_labels is not None:
        counts = torch.bincount(train_labels, minlength=len(fmt.classes))
        steps = cfg.data.max_items if cfg.data.layout == "scatter" else None
    return LabelSequence(fmt, cfg.model["label_order"], counts, label_smoothing=cfg.optim.label_smoothing, tta=tta,
                         target=cfg.model["target"], steps=steps)
