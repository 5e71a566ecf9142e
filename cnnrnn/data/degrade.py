"""Degraded items: blur, noise and an occluding box, so that vision alone is unsure and context can pay.

Every random choice is a hash of the item's seed, not a draw from a generator, so a fixed (validation, test)
image is degraded the same way whatever batch it comes in, and a training batch replays exactly on resume.
Tensor ops on the whole batch: albumentations has these transforms (Downscale, GaussNoise, CoarseDropout),
but its per-item calls cost ~100 us each here, a third of a composite training step for three of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_M1, _M2, _GOLDEN = -4658895280553007687, -7723592293110705685, -7046029254386353131  # splitmix64, as int64


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic): a well-spread hash of each element."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _M1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform(seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """A float in [0, 1) per seed, one independent stream per `stream` number."""
    return (mix(seeds * 1_000_003 + stream) & ((1 << 24) - 1)).double().div(1 << 24).float()


def degrade(items: torch.Tensor, seeds: torch.Tensor, strength: float, background: tuple[int, ...] = (0,)
            ) -> torch.Tensor:
    """uint8 items (N, C, S, S), one int64 seed each, strength in (0, 1]: blurred (down to S/(1+2s) pixels and
    back), a box of the background tone, up to 20s/28 of the side, hiding part of the item, and noise of up to
    +-96s."""
    if strength <= 0 or not len(items):
        return items
    n, side = len(items), items.shape[-1]
    small = max(4, round(side / (1 + 2 * strength)))
    x = F.interpolate(F.interpolate(items.float(), size=small, mode="area"), size=side, mode="bilinear",
                      align_corners=False)                                         # (N, C, S, S)
    box = round(20 * strength * side / 28)
    if box:
        r = torch.arange(side, device=items.device)
        y0 = (uniform(seeds, 1) * (side - box + 1)).long()[:, None]
        x0 = (uniform(seeds, 2) * (side - box + 1)).long()[:, None]
        inside = (((r >= y0) & (r < y0 + box))[:, :, None] & ((r >= x0) & (r < x0 + box))[:, None, :])
        x = torch.where(inside[:, None], x.new_tensor(background).view(1, -1, 1, 1), x)
    pixels = seeds[:, None] * (side * side) + torch.arange(side * side, device=items.device)  # (N, S*S) per pixel
    noise = (uniform(pixels, 3) * 2 - 1).view(n, 1, side, side) * (96 * strength)
    return (x + noise).round_().clamp_(0, 255).to(torch.uint8)
