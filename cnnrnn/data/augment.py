"""Train-time changes of items; validation and test data are never augmented."""
from __future__ import annotations

import torch

SIDE = 28


class Augment:
    """Label-preserving changes of uint8 items (N, 28, 28), light on black, seeded per call: per item, as tensor
    ops on the whole batch, a horizontal flip (probability `hflip`) and a shift of up to `shift` pixels (pad with
    black + crop, so the item stays inside its 28x28 cell).

    The items may be on any device: the draws come from a CPU generator (the same numbers on every device, so a
    seed gives the same batch anywhere), and only the small per-item parameter tensors move to the items' device.
    """

    def __init__(self, hflip: float, shift: int):
        self.hflip, self.shift = hflip, shift

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        # A seed per call (derived from epoch and step) makes every batch reproducible, so a resumed run
        # sees exactly the augmentations an uninterrupted one would have.
        g = torch.Generator().manual_seed(seed)
        flip = (torch.rand(len(images), generator=g) < self.hflip).to(images.device)
        images = torch.where(flip[:, None, None], images.flip(-1), images)
        if self.shift and len(images):
            images = shift(images, self.shift, g)
        return images


def shift(images: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Each item moved by its own random offset in [-pixels, pixels]^2, black coming in at the border."""
    n = len(images)
    padded = torch.nn.functional.pad(images, (pixels,) * 4)                       # (N, 28+2p, 28+2p)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=g).to(images.device)  # crop corner per item
    r = torch.arange(SIDE, device=images.device)
    rows = (dy + r)[:, :, None]                                                   # (N, 28, 1)
    cols = (dx + r)[:, None, :]                                                   # (N, 1, 28)
    return padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]  # (N, 28, 28)
