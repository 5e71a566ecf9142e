"""Multi-label pictures made outside the project (numpy and Pillow only, from Fashion-MNIST's raw IDX files), as a
user would bring them: python docs/experiments/make_pictures.py OUT N [--split train|test] [--canvas 64] [--seed 0]
[--sep ' ']

Writes N pictures OUT/pictures/NNNNN.png of 1-4 items of distinct classes at free positions on a black canvas
(combined by their maximum, two items' boxes overlapping by at most a quarter of an item; a quarter of the pictures
hold one item) and OUT/labels.csv (file, labels: the class names separated by --sep; with the default, a space, the
space of "Ankle boot" is written as '_'; with another, such as '|', the names are Fashion-MNIST's own). The
items come from the given split of Fashion-MNIST only, so test pictures never hold a training item.
"""
import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("n", type=int)
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--sep", default=" ")
    args = parser.parse_args()
    prefix = "train" if args.split == "train" else "t10k"
    root = Path(args.root)
    images = idx(next(root.glob(f"{prefix}-images-idx3-ubyte*")))
    labels = idx(next(root.glob(f"{prefix}-labels-idx1-ubyte*")))
    rng, c = np.random.default_rng(args.seed), args.canvas
    out = Path(args.out)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    rows = ["file,labels"]
    for i in range(args.n):
        k = 1 if rng.random() < 0.25 else int(rng.integers(2, 5))
        classes = rng.choice(10, size=k, replace=False)
        while True:  # free positions, boxes overlapping by at most a quarter of an item
            corners = rng.integers(0, c - 28 + 1, size=(k, 2))
            d = np.abs(corners[:, None] - corners[None])
            shared = np.clip(28 - d, 0, None).prod(-1)
            np.fill_diagonal(shared, 0)
            if shared.max() <= 28 * 28 / 4:
                break
        canvas = np.zeros((c, c), np.uint8)
        for cls, (y, x) in zip(classes, corners):
            item = images[rng.choice(np.flatnonzero(labels == cls))]
            canvas[y:y + 28, x:x + 28] = np.maximum(canvas[y:y + 28, x:x + 28], item)
        Image.fromarray(canvas).save(out / "pictures" / f"{i:05d}.png")
        names = [NAMES[j] if args.sep == " " else NAMES[j].replace("_", " ") for j in sorted(classes)]
        rows.append(f"pictures/{i:05d}.png,{args.sep.join(names)}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
