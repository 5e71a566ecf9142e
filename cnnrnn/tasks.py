"""Single-label vs multi-label: inputs, loss, prediction and metrics. The only place the two differ.

A task turns a batch dict into model inputs and a loss (`loss`), into predictions from the image alone
(`predict`), and turns the predictions of a whole split into metrics (`metrics`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnrnn import metrics
from cnnrnn.data.composite import cell_crops
from cnnrnn.data.fashion_mnist import CLASSES, SIDE

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training pixels, on the [0, 1] scale


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W) -> normalised float (B, 1, H, W)."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)   # (B, H, W) -> (B, 1, H, W)


def flip_average(model: nn.Module, x: torch.Tensor, tta: bool, to_scores) -> torch.Tensor:
    """Scores of x, averaged with those of its mirror image when `tta` (test-time flips; a mirrored item
    keeps its class, and the set of items in a mirrored composite is the same)."""
    scores = to_scores(model(x))
    return (scores + to_scores(model(x.flip(-1)))) / 2 if tta else scores


class Classification:
    """One label per image: cross-entropy, argmax, accuracy."""

    kind, select = "single", "acc"

    def __init__(self, classes=CLASSES, label_smoothing: float = 0.0, tta: bool = False):
        self.classes, self.label_smoothing, self.tta = tuple(classes), label_smoothing, tta

    def target(self, batch) -> torch.Tensor:
        return batch["label"]

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(to_input(batch["image"]))
        loss = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return loss, {"acc": (logits.argmax(1) == batch["label"]).float().mean()}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        probs = flip_average(model, to_input(batch["image"]), self.tta, lambda z: z.float().softmax(dim=1))
        return {"pred": probs.argmax(dim=1), "scores": probs}

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        return [[int(p)] for p in out["pred"]]

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        return metrics.single_label(target.numpy(), out["pred"].numpy(), self.classes)

    def state(self) -> dict:
        return {}


class MultiLabelBCE:
    """A set of labels per image from independent sigmoids; the threshold is tuned on validation data."""

    kind, select = "bce", "f1_samples"

    def __init__(self, classes=CLASSES, threshold: float = 0.5, tta: bool = False):
        self.classes, self.threshold, self.tta = tuple(classes), threshold, tta

    def target(self, batch) -> torch.Tensor:
        return batch["labels"]

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(to_input(batch["image"]))
        return F.binary_cross_entropy_with_logits(logits.float(), batch["labels"]), {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        scores = flip_average(model, to_input(batch["image"]), self.tta, lambda z: z.float().sigmoid())
        return {"pred": scores >= self.threshold, "scores": scores}

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        return [row.nonzero().flatten().tolist() for row in out["pred"]]

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        return metrics.multi_label(target.numpy(), out["pred"].numpy(), self.classes, out["scores"].numpy())

    def tune(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> float:
        """Set the threshold that maximises micro F1 on these (validation) predictions."""
        self.threshold = metrics.best_threshold(target.numpy(), out["scores"].numpy())
        return self.threshold

    def state(self) -> dict:
        return {"threshold": self.threshold}


class LabelSequence:
    """A set of labels emitted one after another by a decoder, in a chosen training order.

    Orders: 'frequency' (most frequent training class first), 'rare_first', 'spatial' (reading order of
    the cells), 'random' (reshuffled every batch) and 'orderless' (at each step the target is the remaining
    true label the model ranks highest: predicted-label alignment, Yazici et al. 2020).

    target='multiset': one label per item (a class as often as it occurs, repeats next to each other except in
    the spatial order), scored with the multiset metrics beside the set ones. Decoding stops after as many
    labels as the picture has cells (any grid), or `max_items` when set.
    """

    kind, select = "sequence", "f1_samples"

    def __init__(self, classes=CLASSES, order: str = "frequency", class_counts=None, max_labels: int = 4,
                 label_smoothing: float = 0.0, tta: bool = False, target: str = "set", max_items: int | None = None):
        self.classes, self.order, self.max_labels = tuple(classes), order, max_labels
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

    def sequences(self, labels: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Target tokens (B, G*G+1): the label set in this task's order, END, then -100 padding."""
        if self.multiset:
            return self.item_sequences(cells)
        b, c = labels.shape
        steps = cells.shape[1]  # one label per cell at most: the batch's grid, whatever the model was built for
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

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = to_input(batch["image"])
        end = len(self.classes)
        if self.order == "orderless":
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

            logits = model(x, teacher, steps=batch["cells"].shape[1] + 1)
            targets = torch.stack(chosen, dim=1)
        else:
            targets = self.sequences(batch["labels"], batch["cells"])
            logits = model(x, targets)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
        return loss, {}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        # Only the image reaches the decoder, which feeds back its own outputs; the cells (where each true
        # class sits) are passed on beside the predictions for the grounding metric, never to the model.
        out = model.generate(to_input(batch["image"]), flip=self.tta, max_labels=self.limit(batch["image"]))
        pred = {"pred": out["labels"], "scores": out["scores"], "tokens": out["tokens"], "alpha": out["alpha"]}
        if self.multiset:
            pred["counts"] = out["counts"]
        if "cells" in batch:
            pred["cells"] = batch["cells"]
        return pred

    def limit(self, images: torch.Tensor) -> int:
        """Most labels to decode for pictures (B, H, W): one per 28x28 cell, or max_items when set."""
        cells = max(1, images.shape[-2] // SIDE) * max(1, images.shape[-1] // SIDE)
        return min(cells, self.max_items) if self.max_items else cells

    def labels(self, out: dict[str, torch.Tensor]) -> list[list[int]]:
        end = len(self.classes)
        return [[int(t) for t in row if t < end] for row in out["tokens"]]  # in emission order

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        present = target > 0  # the set of a multiset target
        result = metrics.multi_label(present.numpy(), out["pred"].numpy(), self.classes, out["scores"].numpy())
        if "cells" in out:
            result.update(metrics.grounding(out["tokens"], out["alpha"], out["cells"], present))
        if self.multiset:
            result.update(metrics.multiset(target.numpy(), out["counts"].numpy(), self.classes))
        return result

    def state(self) -> dict:
        # the training class counts fix the frequency order, so evaluate rebuilds the very same targets
        return {"order": self.order, "class_counts": self.class_counts}


class TileOracle:
    """Reference for composites: a single-label model applied to each occupied cell, told where the items
    are (batch['cells']), its predictions joined into a set. Scored with the multi-label metrics."""

    kind, select = "oracle", "f1_samples"

    def __init__(self, grid: int, classes=CLASSES):
        self.grid, self.classes = grid, tuple(classes)

    def target(self, batch) -> torch.Tensor:
        return batch["labels"]

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        crops = cell_crops(batch["image"], self.grid)                    # (B, G*G, 28, 28)
        occupied = batch["cells"] >= 0                                   # (B, G*G)
        probs = model(to_input(crops[occupied])).float().softmax(dim=1)  # (items, C)
        cell_probs = probs.new_zeros(*occupied.shape, len(self.classes))
        cell_probs[occupied] = probs                                     # (B, G*G, C), empty cells 0
        pred = torch.zeros_like(cell_probs, dtype=torch.bool)
        pred[occupied] = F.one_hot(probs.argmax(1), len(self.classes)).bool()
        return {"pred": pred.any(dim=1), "scores": cell_probs.amax(dim=1)}

    def metrics(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, float]:
        return metrics.multi_label(target.numpy(), out["pred"].numpy(), self.classes, out["scores"].numpy())
