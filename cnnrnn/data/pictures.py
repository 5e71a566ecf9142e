"""Picture files as the model reads them, the same way in training, evaluate, predict and the ONNX path: what Pillow
opens, made 8-bit gray or RGB by Pillow (16-bit pixels scaled by 65535, float ones by [0, 1], transparent pixels
over black), then by albumentations resized keeping the aspect and padded with the data's background tone. No torch
here: worker processes decode with it."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from cnnrnn.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16- and 32-bit integer pixels


def read(path: str | Path, channels: int = 1, warn=warnings.warn) -> np.ndarray:
    """(H, W, channels) uint8 of an image file; a sentence naming the file if it cannot be read. `warn(message)` is
    told what was changed (a first frame of many, transparent pixels)."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, before decoding them
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if getattr(img, "n_frames", 1) > 1:
                    warn(f"{path} has {img.n_frames} frames; only the first is read.")
                return to_array(img, channels, path, warn)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, too many to read safely "
                        f"(Pillow's decompression-bomb guard); give a smaller image.") from None
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); give an image file you can read.") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:  # Pillow's decoders raise many types
        raise UserError(f"{path} is not a readable image ({type(exc).__name__}); give a PNG or JPEG file.") from None


def to_array(img: Image.Image, channels: int, path, warn) -> np.ndarray:
    if img.mode in WIDE:
        img = img.convert("I").point(lambda v: v * (255 / 65535)).convert("L")   # 16-bit levels to 8-bit
    elif img.mode == "F":
        if not np.isfinite(np.asarray(img)).all():
            raise UserError(f"{path} holds NaN or infinite pixels; give an image of finite values.")
        img = img.point(lambda v: v * 255).convert("L")                          # [0, 1]; beyond clipped
    elif img.mode in ("RGBA", "LA", "PA") or img.mode == "P" and "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # an alpha channel that is all opaque changes nothing: no warning
            warn(f"{path} has transparent pixels; they are read as black.")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    array = np.array(img.convert("L" if channels == 1 else "RGB"))  # a writable copy, for torch.from_numpy
    return array[..., None] if channels == 1 else array


def fit(array: np.ndarray, size: int) -> np.ndarray:
    """The picture resized, keeping its aspect, so that its longer side is `size` (albumentations: area averaging
    when it shrinks, bilinear when it grows)."""
    import albumentations as A

    return A.LongestMaxSize(max_size=size, area_for_downscale="image")(image=array)["image"]


def pad(array: np.ndarray, size: int, background: tuple[int, ...]) -> np.ndarray:
    """A fitted picture padded to size x size with the background tone, centred (albumentations)."""
    import albumentations as A

    tone = background[0] if len(background) == 1 else tuple(background)
    return A.PadIfNeeded(size, size, border_mode=0, fill=tone)(image=array)["image"]  # 0: cv2.BORDER_CONSTANT


def background(fitted: list[np.ndarray]) -> tuple[int, ...]:
    """The data's background tone: the median of the training items' border pixels (around an item drawn in the
    middle), per channel."""
    edges = [np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]) for a in fitted]  # (K, channels) each
    return tuple(int(v) for v in np.median(np.concatenate(edges), axis=0))
