"""Items in memory and what they are: a Split (uint8 pictures and their labels) and its Format (class names, picture
size and channels, normalisation, background tone), which travels with a run: checkpoint, metrics, ONNX, predict."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch

from cnnrnn.errors import UserError


@dataclass
class Split:
    """Pictures (N, C, S, S) uint8 and their class indices (N,) int64, or for multi-label pictures their label sets
    (N, K) float; `files`: where each came from (a user's data), for splits.csv and test_predictions.csv."""

    images: torch.Tensor
    labels: torch.Tensor
    files: list[str] | None = None

    def __post_init__(self):
        if self.images.dim() == 3:  # gray items given as (N, S, S)
            self.images = self.images[:, None]                          # (N, S, S) -> (N, 1, S, S)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> Split:
        index = torch.as_tensor(index, device=self.images.device)
        files = None if self.files is None else [self.files[i] for i in index.tolist()]
        return Split(self.images[index], self.labels[index], files)

    def to(self, device: torch.device | str) -> Split:
        """This split with its items and labels on `device` (once per run: the batches are then gathered there)."""
        return Split(self.images.to(device), self.labels.to(device), self.files)


@dataclass(frozen=True)
class Format:
    """What the items are: class names (index order), side and channels, the normalisation of their pixels, the
    tone of an empty cell, and whether a mirror image keeps its class (flips then are the default). `picture`: 0 for
    items of one class each, else the side of multi-label pictures, read in windows of `size` (a CSV of pictures)."""

    classes: tuple[str, ...]
    size: int = 28
    channels: int = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    background: tuple[int, ...] = (0,)
    flips: bool = False
    picture: int = 0

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pictures (B, C, H, W), or gray ones (B, H, W) -> normalised float (B, C, H, W)."""
        x = (images[:, None] if images.dim() == 3 else images).float() / 255.0
        if self.channels == 1:
            return (x - self.mean[0]) / self.std[0]
        view = (1, self.channels, 1, 1)
        return (x - x.new_tensor(self.mean).view(view)) / x.new_tensor(self.std).view(view)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(values: dict) -> Format:
        return Format(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def stratified(labels: list, count: int, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(kept, drawn): `count` of the indices drawn, stratified by class where every class allows it."""
    from sklearn.model_selection import train_test_split

    by_class = Counter(labels)
    try:
        kept, drawn = train_test_split(np.arange(len(labels)), test_size=count, random_state=seed,
                                       stratify=labels if min(by_class.values()) >= 2 and count >= len(by_class)
                                       else None)
    except ValueError as exc:
        raise UserError(f"Cannot hold out {count} {what} items of {len(labels)} ({exc}); set data.val_size to a "
                        f"count or share the data allows.") from None
    return sorted(kept.tolist()), sorted(drawn.tolist())
