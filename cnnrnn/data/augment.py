"""Train-time changes of items; validation and test data are never augmented."""
from __future__ import annotations

import torch


class Augment:
    """Label-preserving changes of uint8 items (N, C, S, S), seeded per call: per item, as tensor ops on the whole
    batch, a horizontal flip (probability `hflip`) and a shift of up to `shift` pixels (padded with the data's
    background tone, then cropped, so the item stays inside its cell).

    The items may be on any device: the draws come from a CPU generator (the same numbers on every device, so a
    seed gives the same batch anywhere), and only the small per-item parameter tensors move to the items' device.
    """

    def __init__(self, hflip: float, shift: int, background: tuple[int, ...] = (0,)):
        self.hflip, self.shift, self.background = hflip, shift, background

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        # A seed per call (derived from epoch and step) makes every batch reproducible, so a resumed run
        # sees exactly the augmentations an uninterrupted one would have.
        g = torch.Generator().manual_seed(seed)
        flip = (torch.rand(len(images), generator=g) < self.hflip).to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if self.shift and len(images):
            images = shift(images, self.shift, g, self.background)
        return images


def shift(images: torch.Tensor, pixels: int, g: torch.Generator, background: tuple[int, ...] = (0,)) -> torch.Tensor:
    """Each item (N, C, S, S) moved by its own random offset in [-pixels, pixels]^2, the background tone coming in
    at the border."""
    n, c, side = len(images), images.shape[1], images.shape[-1]
    padded = torch.nn.functional.pad(images, (pixels,) * 4)                       # (N, C, S+2p, S+2p)
    if any(background):
        edge = torch.ones_like(images[:1, :1], dtype=torch.bool)
        edge = torch.nn.functional.pad(edge, (pixels,) * 4, value=False).logical_not()
        padded = torch.where(edge, images.new_tensor(background).view(1, -1, 1, 1), padded)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=g).to(images.device)  # crop corner per item
    r = torch.arange(side, device=images.device)
    rows = (dy + r)[:, None, :, None]                                             # (N, 1, S, 1)
    cols = (dx + r)[:, None, None, :]                                             # (N, 1, 1, S)
    items, chans = torch.arange(n, device=images.device), torch.arange(c, device=images.device)
    return padded[items[:, None, None, None], chans[None, :, None, None], rows, cols]  # (N, C, S, S)
