"""Convolutional models: the small single-label CNN, the encoder it shares, and the multi-label BCE head."""
from __future__ import annotations

import torch
from torch import nn

CELL = 28  # pixels a side of one item, and of one cell of a composite


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
    """Stages of (conv3x3 + batch norm + ReLU) x convs and a 2x2 max pool: (B, 1, H, W) -> (B, C, H/2^n, W/2^n).

    Each stage pools right after its last conv, before batch norm and ReLU: the ReLU and the max commute, and
    batch norm then sees a quarter of the pixels (its statistics are the pooled map's), so a training step on
    CPU, where these memory-bound layers dominate, is faster at the same validation accuracy (docs/speed.md).
    """

    def __init__(self, channels: tuple[int, ...], convs: int):
        super().__init__()
        layers, c_in = [], 1
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
                 dropout: float = 0.3, side: int = 28):
        super().__init__()
        self.encoder = ConvEncoder(channels, convs)
        cells = (side // 2 ** len(channels)) ** 2
        self.dense = nn.Sequential(
            nn.Flatten(),                     # (B, C, h, w) -> (B, C*h*w)
            FastDropout(dropout),
            nn.Linear(self.encoder.out_channels * cells, hidden),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(FastDropout(dropout), nn.Linear(hidden, num_classes))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Items (N, 1, 28, 28) -> features (N, hidden)."""
        return self.dense(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def read_cells(reader: SmallCNN, x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The reader's features of every 28x28 cell of pictures (B, 1, H, W), in reading order: (B, L, D). With `flip`,
    each cell's features averaged with its mirror image's (test-time flips)."""
    b, _, h, w = x.shape
    gh, gw = h // CELL, w // CELL
    cells = x.reshape(b, gh, CELL, gw, CELL).transpose(2, 3)             # (B, 1, H, W) -> (B, gh, gw, 28, 28)
    cells = cells.reshape(b * gh * gw, 1, CELL, CELL)                     # (B*L, 1, 28, 28), reading order
    feats = reader.embed(cells)
    if flip:
        feats = (feats + reader.embed(cells.flip(-1))) / 2
    return feats.view(b, gh * gw, -1)                                     # (B*L, D) -> (B, L, D)


class ReadsCells(nn.Module):
    """A composite model built on the per-item reader (`self.reader`), which `freeze_reader` keeps as it is: no
    gradients, batch norm in eval mode even while the rest trains."""

    frozen = False

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
                 cell_dim: int = 256, dropout: float = 0.3):
        super().__init__()
        self.reader = SmallCNN(num_classes, channels, convs, cell_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(cell_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 1, H, W), or the reader's cell features (B, L, D) -> logits (B, classes)."""
        feats = x if x.dim() == 3 else read_cells(self.reader, x)      # (B, L, D)
        return self.head(self.drop(feats.amax(dim=1)))                 # (B, D) -> (B, classes)
