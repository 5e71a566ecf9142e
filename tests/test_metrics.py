"""Metric functions on hand-computed cases: multi-label, single-label, thresholds, grounding, multisets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cnnrnn import metrics
from cnnrnn.data.fashion_mnist import CLASSES as FASHION

CLASSES = ("a", "b", "c")
# 4 images x 3 classes; counted by hand below.
TRUE = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]])
PRED = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 1]])


def test_multi_label_by_hand():
    m = metrics.multi_label(TRUE, PRED, CLASSES)
    # class a: tp 2, fp 1, fn 0; b: tp 1, fp 0, fn 1; c: tp 1, fp 0, fn 1
    assert m["precision_micro"] == pytest.approx(4 / 5) and m["recall_micro"] == pytest.approx(4 / 6)
    assert m["f1_micro"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    f1 = {"a": 2 * 2 / (2 * 2 + 1), "b": 2 / 3, "c": 2 / 3}
    assert m["f1/a"] == pytest.approx(f1["a"]) and m["f1_macro"] == pytest.approx(np.mean(list(f1.values())))
    p_macro, r_macro = (2 / 3 + 1 + 1) / 3, (1 + 0.5 + 0.5) / 3
    assert m["cf1"] == pytest.approx(2 * p_macro * r_macro / (p_macro + r_macro))
    assert m["cf1"] != pytest.approx(m["f1_macro"])  # CF1 is not macro-F1
    # per image F1: 1, 2/3, 2/3, 2/3
    assert m["f1_samples"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 2 / 3) / 4)
    assert m["exact_match"] == pytest.approx(1 / 4)
    assert m["hamming_loss"] == pytest.approx(3 / 12)
    assert m["cardinality_acc"] == pytest.approx(1 / 4)  # sizes true 1,2,2,1 vs predicted 1,1,1,2


def test_empty_sets_absent_classes_and_map_by_hand():
    """What the first case lacks: an image with no labels and none predicted, a class never present, and mAP."""
    y = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0]])
    p = np.array([[1, 1, 0], [0, 0, 0], [0, 1, 0]])
    scores = np.array([[0.9, 0.6, 0.1], [0.5, 0.2, 0.5], [0.4, 0.55, 0.2]])
    m = metrics.multi_label(y, p, CLASSES, scores)
    # class a: tp 1, fn 1 -> P 1, R 1/2, F1 2/3; b: tp 1, fp 1 -> P 1/2, R 1, F1 2/3; c: nothing -> 0, 0, 0
    assert m["precision_macro"] == pytest.approx(0.5) and m["recall_macro"] == pytest.approx(0.5)
    assert m["f1_macro"] == pytest.approx(4 / 9) and m["f1/c"] == 0.0
    assert m["precision_micro"] == pytest.approx(2 / 3) and m["f1_micro"] == pytest.approx(2 / 3)
    # per image (P, R, F1): (1/2, 1, 2/3), the empty one (0, 0, 0), (1, 1/2, 2/3)
    assert m["precision_samples"] == pytest.approx(0.5) and m["recall_samples"] == pytest.approx(0.5)
    assert m["f1_samples"] == pytest.approx(4 / 9)
    assert m["exact_match"] == pytest.approx(1 / 3) and m["hamming_loss"] == pytest.approx(2 / 9)
    assert m["cardinality_acc"] == pytest.approx(1 / 3)
    # AP: a ranks +, -, + -> (1 + 2/3) / 2 = 5/6; b ranks -, +, - -> 1/2; c has no positives and is left out
    assert m["map"] == pytest.approx((5 / 6 + 1 / 2) / 2)


def test_arguments_are_true_then_predicted():
    """Swapping them changes precision into recall: the order is part of the contract."""
    m, swapped = metrics.multi_label(TRUE, PRED, CLASSES), metrics.multi_label(PRED, TRUE, CLASSES)
    assert m["precision_micro"] == pytest.approx(swapped["recall_micro"]) != m["recall_micro"]
    s = metrics.single_label(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), CLASSES)
    assert s["acc/a"] == 0.5 and s["acc/b"] == 1.0 and s["acc/c"] == 0.0 and s["acc"] == 0.5


def test_map_perfect_ranking_and_absent_classes():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5], [0.7, 0.6, 0.5]])
    assert metrics.multi_label(y, y, CLASSES, scores)["map"] == pytest.approx(1.0)  # class c has no positives


def test_best_threshold_is_the_micro_f1_optimum():
    y = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.47], [0.44], [0.9], [0.1]])
    # only thresholds in (0.44, 0.47] are perfect (F1 1); the grid's 0.40 gives F1 2*2/(2*2+1) = 0.8, 0.50 gives 2/3
    assert metrics.best_threshold(y, scores) == pytest.approx(0.45)
    # ties go to the lowest threshold: here 0.25, 0.30 and 0.35 are all perfect
    y = np.array([[1, 0], [0, 1], [1, 1]])
    scores = np.array([[0.35, 0.1], [0.2, 0.4], [0.45, 0.38]])
    assert metrics.best_threshold(y, scores) == pytest.approx(0.25)


COAT, TROUSER, TSHIRT, SANDAL = (FASHION.index(c) for c in ("Coat", "Trouser", "T-shirt/top", "Sandal"))


CELL_BOXES = torch.tensor([[0, 0], [0, 28], [28, 0], [28, 28]])      # a 2x2 grid of 28x28 cells
CELL_CENTERS = CELL_BOXES + 14.0


def ground(tokens, alpha, cells, y, centers=CELL_CENTERS):
    n = len(cells)
    return metrics.grounding(tokens, alpha, cells, CELL_BOXES.expand(n, -1, -1), centers.expand(n, -1, -1), 28, y)


def test_grounding_is_one_on_the_right_item_and_zero_on_a_wrong_one():
    cells = torch.tensor([[COAT, TROUSER, -1, COAT], [SANDAL, -1, -1, -1]])
    y = torch.zeros(2, 10)
    y[0, [COAT, TROUSER]] = 1
    y[1, SANDAL] = 1
    tokens = torch.tensor([[TROUSER, COAT, 10], [SANDAL, 10, 10]])
    right = torch.zeros(2, 3, 4)
    right[0, 0, 1] = 1   # Trouser at cell 1; Coat sits in two cells and does not count
    right[1, 0, 0] = 1
    assert ground(tokens, right, cells, y) == {"grounding": 1.0, "grounding_mass": 1.0}
    wrong = torch.zeros(2, 3, 4)
    wrong[0, 0, 2] = wrong[1, 0, 3] = 1
    assert ground(tokens, wrong, cells, y) == {"grounding": 0.0, "grounding_mass": 0.0}
    # a wrongly emitted label does not count; finer positions (windows every 14 pixels) count inside the box
    fine = torch.zeros(2, 3, 16)
    fine[:, 0, 0] = 0.75
    fine[:, 0, 15] = 0.25
    windows = torch.stack(torch.meshgrid(torch.arange(4) * 14.0 + 7, torch.arange(4) * 14.0 + 7, indexing="ij"),
                          -1).flatten(0, 1)
    out = ground(torch.tensor([[TSHIRT, 10, 10], [SANDAL, 10, 10]]), fine, cells, y, windows)
    assert out == {"grounding": 1.0, "grounding_mass": 0.75}


def test_grounding_is_empty_when_no_step_counts():
    cells = torch.tensor([[COAT, COAT, -1, -1]])
    y = torch.zeros(1, 10)
    y[0, COAT] = 1
    assert ground(torch.tensor([[COAT, 10]]), torch.full((1, 2, 4), 0.25), cells, y) == {}


def test_multiset_metrics_on_hand_made_counts():
    classes = ["a", "b", "c"]
    true = np.array([[2, 0, 1], [0, 1, 0], [1, 1, 1]])
    pred = np.array([[1, 0, 1], [0, 3, 0], [1, 1, 1]])  # one too few a; two too many b; right
    m = metrics.multiset(true, pred, classes)
    assert m["multiset_exact"] == pytest.approx(1 / 3)
    assert m["count_acc"] == pytest.approx(1 / 3)                  # totals 3/2, 1/3, 3/3
    # per class: matches a 2 of (3 true + 2 pred); b 2 of (2 + 4); c 2 of (2 + 2)
    assert m["multiset_f1/a"] == pytest.approx(4 / 5) and m["multiset_f1/b"] == pytest.approx(4 / 6)
    assert m["multiset_f1/c"] == pytest.approx(1.0)
    assert m["multiset_f1_micro"] == pytest.approx(12 / 15)
    assert m["multiset_f1_macro"] == pytest.approx((4 / 5 + 4 / 6 + 1) / 3)
    assert m["count_mae/a"] == pytest.approx(1 / 3) and m["count_mae/b"] == pytest.approx(2 / 3)
    assert m["count_mae/c"] == 0 and m["count_mae"] == pytest.approx(1 / 3)


def test_class_names_become_metric_keys_without_slashes_or_spaces():
    assert metrics.slug("T-shirt/top") == "T-shirt-top" and metrics.slug("Ankle boot") == "Ankle_boot"
    keys = metrics.single_label(np.array([0, 9]), np.array([0, 9]), FASHION)
    assert "acc/T-shirt-top" in keys and "acc/Ankle_boot" in keys


def test_confusion_counts_true_rows_and_predicted_columns():
    cm = metrics.confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
