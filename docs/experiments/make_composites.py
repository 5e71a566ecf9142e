"""2x2 composites of a user's pictures, made outside the project (numpy and Pillow only), to score a multi-label model
with predict: python docs/experiments/make_composites.py FOLDER/test OUT N [--cell 32] [--seed 0]

FOLDER/test holds class folders of pictures of any size and mode. Each composite is a 2x2 grid of cell x cell
pixels on black holding 1-4 pictures of distinct classes (each fitted into its cell, larger or smaller, aspect kept,
centred, made 8-bit gray), the other cells empty; OUT/pictures/NNNNN.png and OUT/labels.csv (file, labels: the class names).
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("n", type=int)
    parser.add_argument("--cell", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    classes = sorted(p.name for p in Path(args.folder).iterdir() if p.is_dir())
    files = {c: sorted(f for f in (Path(args.folder) / c).iterdir() if f.is_file()) for c in classes}
    rng, cell, out = np.random.default_rng(args.seed), args.cell, Path(args.out)
    (out / "pictures").mkdir(parents=True, exist_ok=True)
    rows = ["file,labels"]
    for i in range(args.n):
        k = int(rng.integers(1, 5))
        chosen = rng.choice(len(classes), size=k, replace=False)
        slots = rng.choice(4, size=k, replace=False)
        canvas = Image.new("L", (2 * cell, 2 * cell))
        for c, slot in zip(chosen, slots):
            with Image.open(files[classes[c]][int(rng.integers(len(files[classes[c]])))]) as img:
                if img.mode.startswith("I"):  # 16-bit levels: Pillow's convert("L") would clip them, not scale
                    img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
                img = ImageOps.contain(img.convert("L"), (cell, cell))  # longer side one cell, aspect kept
                y, x = divmod(int(slot), 2)
                canvas.paste(img, (x * cell + (cell - img.width) // 2, y * cell + (cell - img.height) // 2))
        canvas.save(out / "pictures" / f"{i:05d}.png")
        rows.append(f"pictures/{i:05d}.png,{' '.join(classes[c] for c in sorted(chosen))}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
