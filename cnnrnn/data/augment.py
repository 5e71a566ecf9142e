"""Train-time augmentation of 28x28 items with albumentations; validation and test data are never augmented."""
from __future__ import annotations

import numpy as np
import torch


class Augment:
    """Random flip, shift (pad + crop) and erasing of uint8 items (N, 28, 28), seeded per call."""

    def __init__(self, hflip: float = 0.5, shift: int = 2, erase: float = 0.0):
        import albumentations as A  # here, not at module level: a second of start-up that only augmented runs need
        import cv2

        side = 28
        steps = [A.HorizontalFlip(p=hflip)]
        if shift:
            steps += [A.PadIfNeeded(side + 2 * shift, side + 2 * shift, border_mode=cv2.BORDER_CONSTANT, fill=0),
                      A.RandomCrop(side, side)]
        if erase:
            steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(4, 12),
                                         hole_width_range=(4, 12), fill=0, p=erase))
        self.pipeline = A.Compose(steps)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        # A seed per call (derived from epoch and step) makes every batch reproducible, so a resumed run
        # sees exactly the augmentations an uninterrupted one would have.
        self.pipeline.set_random_seed(seed)
        items = images.numpy()
        out = np.stack([self.pipeline(image=item)["image"] for item in items]) if len(items) else items
        return torch.from_numpy(out)
