"""Figures for TensorBoard and PNG: curves, confusion matrix, labelled image grids, attention, per-class bars."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OK, WRONG = "#1a7f37", "#cf222e"


def _subplots(*args, **kwargs):
    """plt.subplots with the Agg backend (files only, never a window); matplotlib is imported on first use, as it
    would add most of a second to every command's start, a bad command line's answer included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def curves(history: list[dict], metric: str, title: str = "") -> Figure:
    """Metric and loss per epoch, train and validation, like the write-up's performance plots."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _subplots(1, 2, figsize=(10, 3.8))
    epochs = [h["epoch"] for h in history]
    for ax, name in zip(axes, (metric, "loss")):
        for split, style in (("train", "-o"), ("val", "-s")):
            key = "train/epoch_loss" if (split, name) == ("train", "loss") else f"{split}/{name}"
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_matrix(cm: np.ndarray, classes) -> Figure:
    """Row-normalised confusion matrix with counts (rows: true class)."""
    fig, ax = _subplots(figsize=(7, 6))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(cm.shape):
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return fig


def show(ax, image: torch.Tensor, **kwargs) -> None:
    """A uint8 picture (C, H, W), gray or RGB, on an axis."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=255, **kwargs)
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), **kwargs)  # (C, H, W) -> (H, W, C)


def labelled_grid(images: torch.Tensor, true: list[list[str]], pred: list[list[str]], cols: int = 6) -> Figure:
    """Pictures (N, C, H, W) with their true and predicted names; a wrong prediction is red, missed names listed."""
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = _subplots(rows, cols, figsize=(cols * 2.0, rows * 2.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t, p in zip(axes.flat, images, true, pred):
        show(ax, img)
        marks = [name if name in t else f"✗{name}" for name in p]
        ax.set_title(f"true: {', '.join(t)}\npred: {', '.join(marks) or '(none)'}", fontsize=6.5,
                     color=OK if set(t) == set(p) else WRONG)
    fig.tight_layout()
    return fig


def heat(alpha: torch.Tensor, centers: torch.Tensor, shape, side: int) -> torch.Tensor:
    """An attention map (H, W) over a picture: each position's weight painted over the square around its centre
    (centers (L, 2)) as wide as the step between positions, or a whole cell (side) where they are cells."""
    step = float((centers[1] - centers[0]).abs().max()) if len(centers) > 1 else side
    half = max(1.0, min(step, side) / 2)
    ys, xs = torch.arange(shape[0]) + 0.5, torch.arange(shape[1]) + 0.5
    near_y = (ys[None, :] - centers[:, :1]).abs() < half                       # (L, H)
    near_x = (xs[None, :] - centers[:, 1:]).abs() < half                       # (L, W)
    return torch.einsum("l,lh,lw->hw", alpha.float(), near_y.float(), near_x.float())


def attention(images: torch.Tensor, alphas: torch.Tensor, tokens: torch.Tensor, classes, centers: torch.Tensor,
              side: int) -> Figure:
    """Per picture, the attention at each decoding step painted over it, titled with the label it emitted."""
    n, steps, end = len(images), alphas.shape[1], len(classes)
    fig, axes = _subplots(n, steps + 1, figsize=((steps + 1) * 1.8, n * 1.9), squeeze=False)
    for i in range(n):
        img = images[i]
        show(axes[i, 0], img)
        axes[i, 0].set_title("image", fontsize=7)
        for t in range(steps):
            if t > 0 and int(tokens[i, t - 1]) == end:
                break  # nothing is decoded after END
            ax, token = axes[i, t + 1], int(tokens[i, t])
            show(ax, img)
            amap = heat(alphas[i, t], centers.cpu(), img.shape[1:], side)
            ax.imshow(amap.numpy(), cmap="magma", alpha=0.5, vmin=0, vmax=max(float(amap.max()), 1e-6))
            ax.set_title(f"{t + 1}: {classes[token] if token < end else 'END'}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def per_class_bars(values: dict[str, float], ylabel: str) -> Figure:
    fig, ax = _subplots(figsize=(7, 3.5))
    names = list(values)
    ax.bar(range(len(names)), [values[k] for k in names], color="#0969da")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(min(0.5, min(values.values()) - 0.05), 1.0)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def save(fig: Figure, path) -> None:
    """Write the figure as a PNG file (atomically: files.write_atomic) and free it."""
    import matplotlib.pyplot as plt

    from cnnrnn.files import write_atomic
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def compare_curves(series: dict[str, list[tuple[str, list, list]]], xlabel: str) -> Figure:
    """Validation curves of many runs overlaid, one axis per metric ({ylabel: [(run, xs, ys)]})."""
    fig, axes = _subplots(1, len(series), figsize=(6.5 * len(series), 4.2), squeeze=False)
    for ax, (ylabel, runs) in zip(axes[0], series.items()):
        for name, xs, ys in runs:
            ax.plot(xs, ys, "-o", ms=2.5, lw=1.2, label=name)
        ax.set_xlabel(xlabel)
        if xlabel == "epoch":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(xs for _, xs, _ in runs):
            ax.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    return fig
