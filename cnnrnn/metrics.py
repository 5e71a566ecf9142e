"""Metric functions on whole splits (scikit-learn underneath). Arguments are always (y_true, y_pred)."""
from __future__ import annotations

import warnings

import numpy as np

AT_HALF = ("f1_micro", "f1_macro", "f1_samples", "exact_match", "hamming_loss")  # BCE: also at the untuned 0.5
# scikit-learn is imported where it is used: at module level it would add a second to every command's start,
# a bad command line's answer included.


def slug(name: str) -> str:
    """A class name usable inside a metric key: 'T-shirt/top' -> 'T-shirt-top', 'Ankle boot' -> 'Ankle_boot'."""
    return name.replace("/", "-").replace(" ", "_")


def single_label(y_true: np.ndarray, y_pred: np.ndarray, classes) -> dict[str, float]:
    """Accuracy and per-class accuracy (recall of each class)."""
    from sklearn import metrics as skm

    out = {"acc": float(skm.accuracy_score(y_true, y_pred))}
    recall = skm.recall_score(y_true, y_pred, labels=range(len(classes)), average=None, zero_division=0)
    out.update({f"acc/{slug(c)}": float(r) for c, r in zip(classes, recall)})
    return out


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(true, predicted) counts."""
    from sklearn import metrics as skm

    return skm.confusion_matrix(y_true, y_pred, labels=range(num_classes))


def multi_label(y_true: np.ndarray, y_pred: np.ndarray, classes, scores: np.ndarray | None = None
                ) -> dict[str, float]:
    """Multi-label metrics of 0/1 matrices (N, C); mAP too where scores (N, C) are given.

    f1_macro is the mean of per-class F1; cf1 is the harmonic mean of macro precision and macro recall
    (the 'CF1' of the CNN-RNN literature), which is a different number.
    """
    from sklearn import metrics as skm

    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    out = {}
    for avg in ("micro", "macro", "samples"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r = out["precision_macro"], out["recall_macro"]
    out["cf1"] = 2 * p * r / (p + r) if p + r else 0.0
    out["exact_match"] = float(skm.accuracy_score(y_true, y_pred))
    out["hamming_loss"] = float(skm.hamming_loss(y_true, y_pred))
    out["cardinality_acc"] = float(np.mean(y_true.sum(1) == y_pred.sum(1)))
    per_class = skm.f1_score(y_true, y_pred, average=None, zero_division=0)
    out.update({f"f1/{slug(c)}": float(f) for c, f in zip(classes, per_class)})
    if scores is not None:
        present = y_true.sum(0) > 0  # AP is undefined for a class with no positives
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["map"] = float(skm.average_precision_score(y_true[:, present], scores[:, present], average="macro"))
    return out


def best_threshold(y_true: np.ndarray, scores: np.ndarray, grid=np.linspace(0.05, 0.95, 19)) -> float:
    """The global threshold that maximises micro F1 (tune on validation data only)."""
    from sklearn import metrics as skm

    f1 = [skm.f1_score(y_true, scores >= t, average="micro", zero_division=0) for t in grid]
    return float(grid[int(np.argmax(f1))])


def grounding(tokens, alpha, cells, boxes, centers, side: int, y_true) -> dict[str, float]:
    """Where the decoder looked when it named an item right (the attention of that step over the picture).

    Over every correctly emitted label whose class is that of exactly one item: `grounding` is the share of such
    steps whose attention peak (the centre of the position with the highest weight) falls inside that item's box,
    `grounding_mass` the mean attention on the positions whose centres do. tokens (N, T) emitted classes (>= C:
    END), alpha (N, T, L) attention over L positions centred at centers (N, L, 2) (y, x) pixels, cells (N, M) the class
    of each item (-1: none), boxes (N, M, 2) their top-left corners, items side x side; y_true (N, C) the true
    label sets. Empty if no step counts.
    """
    num_classes = y_true.shape[1]
    label = tokens.clamp(max=num_classes - 1)                                              # (N, T)
    correct = (tokens < num_classes) & y_true.bool().gather(1, label)                      # (N, T)
    holds = cells[:, None, :] == label[:, :, None]                                         # (N, T, M)
    eligible = correct & (holds.sum(2) == 1)
    if not eligible.any():
        return {}
    where = holds.float().argmax(2)                                                        # (N, T) the one item
    corner = boxes.gather(1, where.flatten(1)[..., None].expand(-1, -1, 2)).view(*where.shape, 2).float()  # (N,T,2)
    inside = ((centers[:, None] >= corner[:, :, None]) &
              (centers[:, None] < corner[:, :, None] + side)).all(-1)                      # (N, T, L)
    mass = (alpha.float() * inside).sum(2)
    peak = inside.gather(2, alpha.float().argmax(2, keepdim=True)).squeeze(2)
    return {"grounding": float(peak[eligible].float().mean()), "grounding_mass": float(mass[eligible].mean())}


def multiset(y_true: np.ndarray, y_pred: np.ndarray, classes) -> dict[str, float]:
    """Counting metrics of count matrices (N, C): items of each class per image, true and predicted.

    multiset_exact: every class with its count right; count_acc: the number of items right; multiset F1 per
    class from matches = min(predicted, true) counts (F1 = 2 * matches / (predicted + true), summed over the
    images; micro over all classes, macro the mean of per-class values); count_mae: mean |predicted - true|
    per class and image (and per class).
    """
    from sklearn import metrics as skm

    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    matches = np.minimum(y_true, y_pred).sum(0)                       # (C,)
    totals = y_true.sum(0) + y_pred.sum(0)                            # (C,)
    per_class = np.divide(2 * matches, totals, out=np.zeros(len(matches)), where=totals > 0)
    mae = skm.mean_absolute_error(y_true, y_pred, multioutput="raw_values")
    out = {"multiset_exact": float(np.all(y_true == y_pred, axis=1).mean()),
           "count_acc": float(skm.accuracy_score(y_true.sum(1), y_pred.sum(1))),
           "multiset_f1_micro": float(2 * matches.sum() / totals.sum()) if totals.sum() else 0.0,
           "multiset_f1_macro": float(per_class.mean()), "count_mae": float(mae.mean())}
    out.update({f"multiset_f1/{slug(c)}": float(f) for c, f in zip(classes, per_class)})
    out.update({f"count_mae/{slug(c)}": float(m) for c, m in zip(classes, mae)})
    return out
