"""The write-up's row reader: an image as 28 time steps of 28 pixels (of each channel), an LSTM, a linear head."""
from __future__ import annotations

import torch
from torch import nn


class RowLSTM(nn.Module):
    """LSTM over image rows; classifies from the last layer's final hidden state."""

    def __init__(self, num_classes: int = 10, hidden: int = 186, layers: int = 1, dropout: float = 0.0,
                 width: int = 28):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.transpose(1, 2).flatten(2)  # (B, C, H, W) -> (B, H, C*W): H steps of the row's pixels
        _, (h, _) = self.lstm(rows)          # h: (layers, B, hidden)
        return self.head(self.drop(h[-1]))   # (B, hidden) -> (B, classes)
