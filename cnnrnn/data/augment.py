"""Train-time augmentation of 28x28 items; validation and test data are never augmented."""
from __future__ import annotations

import numpy as np
import torch

SIDE = 28
GROUP = 16  # items that share one albumentations draw (see Augment)


class Augment:
    """Label-preserving changes of uint8 items (N, 28, 28), light on black, seeded per call.

    Per item, as tensor ops on the whole batch: a horizontal flip, a shift of up to `shift` pixels (pad with
    black + crop, so the item stays inside its 28x28 cell) and random erasing of one box (probability `erase`).
    Small rotations and scalings (`rotate` degrees, `scale` fraction) and contrast/brightness changes
    (`contrast`) go through albumentations, whose per-item calls cost ~100 us each in Python (a third of a
    composite step); its batch API transforms GROUP items with one draw for a tenth of that, so the items are
    shuffled into groups of GROUP and each group gets its own draw.

    The items may be on any device: the draws come from a CPU generator (the same numbers on every device, so a
    seed gives the same batch anywhere), and only the small per-item parameter tensors move to the items'
    device. The albumentations steps run on the CPU (numpy), so there the items go to the CPU and back.
    """

    def __init__(self, hflip: float = 0.5, shift: int = 2, erase: float = 0.0, rotate: float = 0.0,
                 scale: float = 0.0, contrast: float = 0.0):
        self.hflip, self.shift, self.erase, self.pipeline = hflip, shift, erase, None
        steps = []
        if rotate or scale:
            import albumentations as A  # here, not at module level: a second of start-up that only these runs need
            import cv2

            steps.append(A.Affine(scale=(1 - scale, 1 + scale), rotate=(-rotate, rotate), p=1.0,
                                  border_mode=cv2.BORDER_CONSTANT, fill=0))
        if contrast:
            import albumentations as A

            steps.append(A.RandomBrightnessContrast(brightness_limit=contrast, contrast_limit=contrast, p=1.0))
        if steps:
            import albumentations as A

            self.pipeline = A.Compose(steps)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        # A seed per call (derived from epoch and step) makes every batch reproducible, so a resumed run
        # sees exactly the augmentations an uninterrupted one would have.
        g = torch.Generator().manual_seed(seed)
        n = len(images)
        flip = (torch.rand(n, generator=g) < self.hflip).to(images.device)
        images = torch.where(flip[:, None, None], images.flip(-1), images)
        if not n:
            return images
        if self.shift:
            images = shift(images, self.shift, g)
        if self.erase:
            images = erase(images, self.erase, g)
        if self.pipeline is not None:
            images = self._albumentations(images, int(torch.randint(2**31, (1,), generator=g)), g)
        return images

    def _albumentations(self, images: torch.Tensor, seed: int, g: torch.Generator) -> torch.Tensor:
        order = torch.randperm(len(images), generator=g)  # groups mix items of different composites
        self.pipeline.set_random_seed(seed)
        array = images.cpu()[order].numpy()  # albumentations works on numpy arrays: a copy off the device
        out = np.concatenate([self.pipeline(images=array[i:i + GROUP])["images"]
                              for i in range(0, len(array), GROUP)])
        result = torch.empty_like(images, device="cpu")
        result[order] = torch.from_numpy(out.reshape(images.shape))
        return result.to(images.device)


def shift(images: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    """Each item moved by its own random offset in [-pixels, pixels]^2, black coming in at the border."""
    n = len(images)
    padded = torch.nn.functional.pad(images, (pixels,) * 4)                       # (N, 28+2p, 28+2p)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=g).to(images.device)  # crop corner per item
    r = torch.arange(SIDE, device=images.device)
    rows = (dy + r)[:, :, None]                                                   # (N, 28, 1)
    cols = (dx + r)[:, None, :]                                                   # (N, 1, 28)
    return padded[torch.arange(n, device=images.device)[:, None, None], rows, cols]  # (N, 28, 28)


def erase(images: torch.Tensor, p: float, g: torch.Generator, low: int = 4, high: int = 12) -> torch.Tensor:
    """With probability p per item, one black box of low..high pixels a side at a random place."""
    n = len(images)
    on = torch.rand(n, generator=g) < p
    h, w = torch.randint(low, high + 1, (2, n), generator=g)
    y0 = (torch.rand(n, generator=g) * (SIDE - h + 1)).long()
    x0 = (torch.rand(n, generator=g) * (SIDE - w + 1)).long()
    on, h, w, y0, x0 = (t.to(images.device) for t in (on, h, w, y0, x0))  # drawn on the CPU, used by the items
    r = torch.arange(SIDE, device=images.device)
    inside = (((r >= y0[:, None]) & (r < (y0 + h)[:, None]))[:, :, None]
              & ((r >= x0[:, None]) & (r < (x0 + w)[:, None]))[:, None, :])      # (N, 28, 28)
    return images.masked_fill(inside & on[:, None, None], 0)
