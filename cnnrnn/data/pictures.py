"""Picture files as uint8 tensors: what Pillow opens, converted by Pillow and torchvision (16-bit and float pixels
scaled by their range, transparent pixels over the items' black background)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cnnrnn.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm"}
WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16- and 32-bit integer, float


def read_gray(path: Path, warn=warnings.warn) -> torch.Tensor:
    """(H, W) uint8 gray of an image file; a sentence naming the file if it cannot be read. `warn(message)` is told
    what was changed (a first frame of many, transparent pixels)."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, before decoding them
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if getattr(img, "n_frames", 1) > 1:
                    warn(f"{path} has {img.n_frames} frames; only the first is read.")
                return gray(img, path, warn)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, too many to read safely "
                        f"(Pillow's decompression-bomb guard); give a smaller image.") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); give an image file you can read.") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:  # Pillow's decoders raise many types
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}); give a PNG or JPEG file.") from None


def gray(img: Image.Image, path: Path, warn) -> torch.Tensor:
    """(H, W) uint8: 16-bit pixels scaled by 65535, float ones in [0, 1] by 1 (torchvision's to_dtype), 8-bit ones
    converted by Pillow; transparent pixels black, the items' background."""
    if img.mode in WIDE:
        if img.mode == "I":
            img = img.convert("I;16")
        pixels = TF.pil_to_tensor(img)[0]
        if pixels.is_floating_point():
            if not torch.isfinite(pixels).all():
                raise UserError(f"{path} holds NaN or infinite pixels; give an image of finite values.")
            pixels = pixels.clamp(0, 1)
        return TF.to_dtype(pixels, torch.uint8, scale=True)
    if img.mode in ("RGBA", "LA", "PA") or img.mode == "P" and "transparency" in img.info:
        warn(f"{path} has transparent pixels; they are read as black, the background of the items.")
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return TF.pil_to_tensor(img.convert("L"))[0]
