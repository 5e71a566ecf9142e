"""Convolutional models: the small single-label CNN, the encoder it shares, and the multi-label BCE head."""
from __future__ import annotations

import torch
from torch import nn


class FastDropout(nn.Module):
    """nn.Dropout with a mask drawn as one random byte per element, so `p` is rounded to a multiple of 1/256.

    On CPU, nn.Dropout's bernoulli_ costs ~17 ns per element: on the cnn's 3,136 flattened features that was a
    quarter of a training step. Eight mask bytes per 64-bit draw make the mask ~8x cheaper (README, Speed).
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
    """Stages of (conv3x3 + batch norm + ReLU) x convs and a 2x2 max pool: (B, 1, H, W) -> (B, C, H/2^n, W/2^n).

    With `pool_first`, each stage pools right after its last conv, before batch norm and ReLU: the ReLU and the
    max commute, and batch norm then sees a quarter of the pixels (its statistics are the pooled map's), so a
    training step on CPU, where these memory-bound layers dominate, is 1.4x faster (26 vs 37 ms at batch 128).

    With `cell`, a last conv of kernel = stride = `cell` (in feature-map pixels) embeds each non-overlapping
    cell of that size into `cell_dim` features: for 28x28 items after two pools, cell=7 is the small CNN's
    dense-128 layer applied to every 28x28 cell of a composite, giving a (B, cell_dim, grid, grid) map.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64), convs: int = 1, cell: int = 0, cell_dim: int = 128,
                 dropout: float = 0.0, pool_first: bool = False):
        super().__init__()
        layers, c_in = [], 1
        for c_out in channels:
            for i in range(convs):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
                if pool_first and i == convs - 1:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if not pool_first:
                layers.append(nn.MaxPool2d(2))
        if cell:
            layers += [FastDropout(dropout), nn.Conv2d(c_in, cell_dim, cell, stride=cell, bias=False),
                       nn.BatchNorm2d(cell_dim), nn.ReLU(inplace=True)]
            c_in = cell_dim
        self.layers = nn.Sequential(*layers)
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """conv3x3 32 - pool - conv3x3 64 - pool - dense 128 - dense 10, with batch norm and dropout."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = (32, 64), convs: int = 1, hidden: int = 128,
                 dropout: float = 0.3, flat_dropout: float | None = None, side: int = 28, pool_first: bool = True):
        super().__init__()
        self.encoder = ConvEncoder(channels, convs, pool_first=pool_first)
        cells = (side // 2 ** len(channels)) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),                     # (B, C, h, w) -> (B, C*h*w)
            FastDropout(dropout if flat_dropout is None else flat_dropout),
            nn.Linear(self.encoder.out_channels * cells, hidden),
            nn.ReLU(inplace=True),
            FastDropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class CNNBCE(nn.Module):
    """Multi-label baseline: the CNN encoder, global max pool, one linear layer of per-class logits."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, ...] = (32, 64), convs: int = 2, cell: int = 7,
                 cell_dim: int = 256, dropout: float = 0.3, pool_first: bool = True):
        super().__init__()
        self.encoder = ConvEncoder(channels, convs, cell, cell_dim, dropout, pool_first)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)                                                  # (B, C, h, w)
        pooled = feats.amax(dim=(2, 3))                                          # (B, C)
        return self.head(self.drop(pooled))                                      # (B, classes)
