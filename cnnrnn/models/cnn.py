"""Convolutional models: the small single-label CNN, the encoder it shares, and the multi-label BCE head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FastDropout(nn.Module):
    """nn.Dropout with a mask drawn as one random byte per element, so `p` is rounded to a multiple of 1/256.

    On CPU, nn.Dropout draws a random number per element, which on the cnn's flattened features was a large share
    of a training step; eight mask bytes per 64-bit draw make the mask several times cheaper (docs/speed.md).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.cut = round(p * 256)            # a byte below `cut` drops its element

    def extra_repr(self) -> str:
        return f"p={self.cut / 256}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.cut == 0:
            return x
        n = x.numel()
        # randint over the whole int64 range: random_() would leave every eighth byte's top bit at 0
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
        keep = draws.view(torch.uint8)[:n].view(x.shape) >= self.cut    # (8 * ceil(n/8),) bytes -> x's shape
        return x * keep.to(x.dtype).mul_(256 / (256 - self.cut))


class ConvEncoder(nn.Module):
    """Stages of (conv3x3 + batch norm + ReLU) x convs and a 2x2 max pool: (B, C, H, W) -> (B, C', H/2^n, W/2^n).

    Each stage pools right after its last conv, before batch norm and ReLU: the ReLU and the max commute, and
    batch norm then sees a quarter of the pixels (its statistics are the pooled map's), so a training step on
    CPU, where these memory-bound layers dominate, is faster at the same validation accuracy (docs/speed.md).
    """

    def __init__(self, channels: tuple[int, ...], convs: int, in_channels: int = 1):
        super().__init__()
        layers, c_in = [], in_channels
        for c_out in channels:
            for i in range(convs):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
                if i == convs - 1:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """conv3x3 32 - pool - conv3x3 64 - pool - dense 128 - dense 10, with batch norm and dropout: the write-up's
    cnn, and with two convs per stage and a dense layer of 256 the per-item reader of the composite models, which
    apply its `embed` to every 28x28 cell of a picture."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = (32, 64), convs: int = 1, hidden: int = 128,
                 dropout: float = 0.3, side: int = 28, in_channels: int = 1):
        super().__init__()
        self.side, self.stride = side, 2 ** len(channels)  # of the items it reads; its map's step in pixels
        self.encoder = ConvEncoder(channels, convs, in_channels)
        cells = (side // 2 ** len(channels)) ** 2
        self.dense = nn.Sequential(
            nn.Flatten(),                     # (B, C, h, w) -> (B, C*h*w)
            FastDropout(dropout),
            nn.Linear(self.encoder.out_channels * cells, hidden),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(FastDropout(dropout), nn.Linear(hidden, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Items (N, C, S, S) -> features (N, hidden)."""
        return self.dense(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def read_cells(reader: SmallCNN, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The reader's features of every S x S cell of pictures (B, C, H, W), in reading order: (B, L, D). With
    `flip`, each cell's features averaged with its mirror image's (test-time flips)."""
    b, c, h, w = x.shape
    s = reader.side
    gh, gw = h // s, w // s
    cells = x.reshape(b, c, gh, s, gw, s).permute(0, 2, 4, 1, 3, 5)     # (B, C, H, W) -> (B, gh, gw, C, S, S)
    cells = cells.reshape(b * gh * gw, c, s, s)                           # (B*L, C, S, S), reading order
    feats = reader.embed(cells)
    if flip:
        feats = (feats + reader.embed(cells.flip(-1))) / 2
    return feats.view(b, gh * gw, -1)                                     # (B*L, D) -> (B, L, D)


def read_windows(reader: SmallCNN, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The reader slid over whole pictures (B, C, H, W): its convs over the picture, its dense layer as a conv of an
    item's size over their map, so each position is the reader's features of one S x S window, at a stride of
    2^stages pixels, in reading order: (B, L, D). With `flip`, averaged with the mirror image's, mirrored back."""
    maps = reader.dense[1](reader.encoder(x))                                # (B, C', H/s, W/s), dropped out
    dense, k = reader.dense[2], reader.side // reader.stride                  # k: an item's side on the map
    kernel = dense.weight.view(dense.out_features, reader.encoder.out_channels, k, k)  # (D, C'kk) -> (D, C', k, k)
    feats = torch.relu(F.conv2d(maps, kernel, dense.bias))                    # (B, D, h, w)
    if flip:
        mirror = read_windows(reader, x.flip(-1)).transpose(1, 2).reshape(feats.shape)  # (B, L, D) -> (B, D, h, w)
        feats = (feats + mirror.flip(-1)) / 2
    return feats.flatten(2).transpose(1, 2)                                   # (B, D, h, w) -> (B, h*w, D)


class ReadsCells(nn.Module):
    """A composite model built on the per-item reader (`self.reader`), which `freeze_reader` keeps as it is: no
    gradients, batch norm in eval mode even while the rest trains. `encoder`: 'cells' reads each S x S cell of a
    grid, 'picture' slides the reader over the whole picture (read_windows)."""

    frozen, encoder = False, "cells"

    def centers(self, x: torch.Tensor) -> torch.Tensor:
        """(L, 2) the centre (y, x) in pixels of each position `read` gives for pictures x (B, C, H, W); of the
        cells of a square grid for cell features (B, L, D)."""
        s = self.reader.side
        if x.dim() == 3:
            h = w = round(x.shape[1] ** 0.5) * s
        else:
            h, w = x.shape[-2:]
        step = s if x.dim() == 3 or self.encoder == "cells" else self.reader.stride
        ys = torch.arange(0, h - s + 1, step, device=x.device) + s / 2
        xs = torch.arange(0, w - s + 1, step, device=x.device) + s / 2
        return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1)  # (h', w', 2) -> (L, 2)

    def read(self, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """Features (B, L, D) of pictures (B, C, H, W), or the reader's cell features (B, L, D) as they are."""
        if x.dim() == 3:
            return x
        return (read_cells if self.encoder == "cells" else read_windows)(self.reader, x, flip)

    def freeze_reader(self) -> None:
        self.frozen = True
        self.reader.requires_grad_(False)
        self.reader.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.reader.eval()
        return self


class CNNBCE(ReadsCells):
    """Multi-label baseline: the reader on every cell, the maximum of each feature over the cells, one linear layer
    of per-class logits."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = (32, 64), convs: int = 2,
                 cell_dim: int = 256, dropout: float = 0.3, encoder: str = "auto", side: int = 28,
                 in_channels: int = 1):
        super().__init__()
        self.reader = SmallCNN(num_classes, channels, convs, cell_dim, dropout, side, in_channels)
        self.encoder = "picture" if encoder == "picture" else "cells"  # auto: build.model decides from the data
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cell_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures (B, C, H, W), or the reader's cell features (B, L, D) -> logits (B, classes)."""
        return self.head(self.drop(self.read(x).amax(dim=1)))         # (B, L, D) -> (B, D) -> (B, classes)
