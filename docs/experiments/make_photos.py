"""Colour photos made outside the project, for the reading speed of docs/your-data.md (numpy and Pillow only):
python docs/experiments/make_photos.py OUT [N] [--side 256] [--seed 0]

Writes N (10,000 by default) JPEG files OUT/train/CLASS/NNNNN.jpg of side x side RGB pixels: a Fashion-MNIST
training item enlarged to most of the frame, tinted with a random colour, over a random colour gradient with noise,
so that the files decode like photos (JPEG quality 90, no two alike). CLASS: the item's class, '/' written as '-'.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("n", type=int, nargs="?", default=10_000)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    args = parser.parse_args()
    root, side = Path(args.root), args.side
    images = idx(next(root.glob("train-images-idx3-ubyte*")))
    labels = idx(next(root.glob("train-labels-idx1-ubyte*")))
    rng = np.random.default_rng(args.seed)
    ramp = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    for i in range(args.n):
        j = int(rng.integers(len(images)))
        item = Image.fromarray(images[j]).resize((side * 7 // 8,) * 2, Image.BILINEAR)
        alpha = np.zeros((side, side, 1), np.float32)
        o = side // 16
        alpha[o:o + item.height, o:o + item.width, 0] = np.asarray(item, np.float32) / 255
        top, bottom, tint = rng.random((3, 3), dtype=np.float32)
        background = (top * (1 - ramp) + bottom * ramp) * 255 + rng.normal(0, 8, (side, side, 3))
        pixels = background * (1 - alpha) + alpha * (155 + 100 * tint)
        folder = Path(args.out) / "train" / NAMES[labels[j]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


if __name__ == "__main__":
    main()
