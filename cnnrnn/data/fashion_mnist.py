"""Find, validate and read Fashion-MNIST's four IDX files; the stratified train/validation split; FORMAT, what its
items are. The one module that names Fashion-MNIST."""
from __future__ import annotations

import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from cnnrnn.data.items import Format, Split, stratified
from cnnrnn.errors import UserError

log = logging.getLogger(__name__)

# Index order as torchvision's FashionMNIST.classes.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SIDE = 28
# Light items on black; the mean and spread of the training pixels on the [0, 1] scale; a mirrored item keeps its
# class, so flips are its recipe.
FORMAT = Format(CLASSES, SIDE, 1, (0.2860,), (0.3530,), (0,), flips=True)
VAL_SIZE = 5000  # held out of the 60,000 training images when data.val_size is null
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu package dataset-fashion-mnist

# name -> (IDX magic, expected item count, MD5 of the decompressed bytes). Debian recompressed the .gz
# archives, so only the decompressed content has one checksum everywhere (docs/design.md, Data).
FILES = {
    "train-images-idx3-ubyte": (2051, 60000, "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train-labels-idx1-ubyte": (2049, 60000, "9018921c3c673c538a1fc5bad174d6f9"),
    "t10k-images-idx3-ubyte": (2051, 10000, "8181f5470baa50b63fa0f6fddb340f0a"),
    "t10k-labels-idx1-ubyte": (2049, 10000, "15d484375f8d13e6eb1aabb0c3f46965"),
}


def _path_in(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate(root: Path) -> tuple[dict[str, Path] | None, list[str]]:
    """The first folder holding all four files, as {name: path}, and a line per folder tried: root flat, root in
    torchvision's layout, the system package."""
    tried = []
    for folder in (root, root / "FashionMNIST" / "raw", SYSTEM_DIR):
        paths = {name: _path_in(folder, name) for name in FILES}
        found = [n for n, p in paths.items() if p is not None]
        if len(found) == len(FILES):
            return paths, tried
        state = f"{len(found)} of 4 files" if found else "no IDX files" if folder.exists() else "not there"
        tried.append(f"{folder} ({state})")
    return None, tried


def _download(root: Path) -> str | None:
    """Let torchvision fetch the official archives into root/FashionMNIST/raw; the failure as text, with its cause
    (torchvision's own error only says which file failed), and no empty folders left behind."""
    made = [p for p in (root, root / "FashionMNIST", root / "FashionMNIST" / "raw") if not p.exists()]
    try:
        from torchvision.datasets import FashionMNIST
        log.info("Downloading Fashion-MNIST into %s", root)
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    except Exception as exc:  # any network or disk failure becomes part of the one error message
        reasons = []
        while exc is not None and len(reasons) < 3:
            reasons.append(" ".join(f"{type(exc).__name__}: {exc}".split()))
            exc = exc.__cause__ or exc.__context__
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # not empty: a partial download stays for the next try
                break
        return ", caused by ".join(reasons)
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"Cannot read {path} ({exc}); delete it and fetch Fashion-MNIST again.") from None


def parse_idx(data: bytes, path: Path, magic: int, count: int) -> torch.Tensor:
    """Validate one IDX payload (magic, count, 28x28, size, label range) and return it as uint8."""
    fix = "delete it and fetch Fashion-MNIST again (see data/README.md)"
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header; {fix}.")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise UserError(f"{path} is not an IDX file of the expected kind (magic number {found_magic}, "
                        f"expected {magic}); {fix}.")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if dims[0] != count:
        raise UserError(f"{path} holds {dims[0]} items, expected {count} for Fashion-MNIST; {fix}.")
    if ndim == 3 and dims[1:] != [SIDE, SIDE]:
        raise UserError(f"{path} holds {dims[1]}x{dims[2]} images, expected {SIDE}x{SIDE}; {fix}.")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "longer than its header says"
        raise UserError(f"{path} is {state}: {len(data)} bytes, expected {expected}; {fix}.")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    if ndim == 1 and array.max(initial=0) > len(CLASSES) - 1:
        raise UserError(f"{path} holds label {int(array.max())}, outside 0..9; {fix}.")
    return torch.from_numpy(array.copy())


def read(paths: dict[str, Path]) -> dict[str, Split]:
    """Read and validate the four files into {'train': Split, 'test': Split}."""
    arrays, digests = {}, {}
    for name, path in paths.items():  # structure first: its errors say more than a checksum's
        magic, count, _ = FILES[name]
        data = _read_bytes(path)
        arrays[name] = parse_idx(data, path, magic, count)
        digests[name] = hashlib.md5(data).hexdigest()
    for name, path in paths.items():
        if digests[name] != FILES[name][2]:
            raise UserError(f"{path} has the right shape but not Fashion-MNIST's content (MD5 differs; an "
                            f"MNIST file in its place?); replace it with the Fashion-MNIST file of that name.")
    return {split: Split(arrays[f"{prefix}-images-idx3-ubyte"][:, None], arrays[f"{prefix}-labels-idx1-ubyte"].long())
            for split, prefix in (("train", "train"), ("test", "t10k"))}


def load(root: str | Path, download: bool = True) -> dict[str, Split]:
    """Find (root, system package, download) and read Fashion-MNIST; one clear error if all fail."""
    root = Path(root)
    paths, tried = locate(root)
    if paths is None and download:
        failure = _download(root)
        paths, _ = locate(root)
        tried.append(f"download into {root / 'FashionMNIST' / 'raw'} ({failure or 'no files after download'})")
    if paths is None:
        raise UserError(
            "Fashion-MNIST not found; tried " + "; ".join(tried) + ". Fix: `sudo apt-get install "
            "dataset-fashion-mnist`, or copy the four IDX files into data.root, or allow the download.")
    log.info("Fashion-MNIST from %s", paths["train-images-idx3-ubyte"].parent)
    return read(paths)


def splits(root: str | Path, val_size: int | float | None, limit: int | None = None,
           split_seed: int = 0) -> dict[str, Split]:
    """{'train', 'val', 'test'}: val carved from the 60k training images (a count, a share, or null: 5,000), train
    optionally limited."""
    data = load(root)
    n_train = len(data["train"])
    count = VAL_SIZE if val_size is None else round(val_size * n_train) if isinstance(val_size, float) else val_size
    if not len(CLASSES) <= count <= n_train - len(CLASSES):
        raise UserError(f"data.val_size={val_size} must hold between {len(CLASSES)} and {n_train - len(CLASSES)} "
                        f"items (Fashion-MNIST has {n_train} training images); set a smaller data.val_size.")
    train_idx, val_idx = stratified(data["train"].labels.tolist(), count, split_seed, "validation")
    if limit is not None:
        train_idx = train_idx[:limit]
    return {"train": data["train"].subset(train_idx), "val": data["train"].subset(val_idx), "test": data["test"]}


def write_folder(out: str | Path, root: str | Path = "data/", per_class: int | None = None,
                 invert: bool = False) -> Path:
    """Fashion-MNIST as a user's folder: OUT/{train,test}/CLASS/NNNNN.png, the official split, class folder names
    made safe for file systems ("T-shirt/top" -> "T-shirt-top", the map in OUT/class_names.csv); `per_class`: the
    first N items of each class per split; `invert`: dark items on white. For docs/your-data.md and the tests."""
    from PIL import Image

    out = Path(out)
    data = load(root)
    safe = {c: c.replace("/", "-") for c in CLASSES}
    for split, items in (("train", data["train"]), ("test", data["test"])):
        for c, name in enumerate(CLASSES):
            index = (items.labels == c).nonzero().flatten()[:per_class]
            folder = out / split / safe[name]
            folder.mkdir(parents=True, exist_ok=True)
            for i in index.tolist():
                pixels = items.images[i, 0].numpy()
                Image.fromarray(255 - pixels if invert else pixels).save(folder / f"{i:05d}.png")
    (out / "class_names.csv").write_text("folder,class\n" + "".join(f'{safe[c]},"{c}"\n' for c in CLASSES))
    return out


if __name__ == "__main__":
    import argparse

    from cnnrnn.errors import refusals

    parser = argparse.ArgumentParser(prog="python -m cnnrnn.data.fashion_mnist", description=write_folder.__doc__)
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--root", default="data/", help="where Fashion-MNIST's files are (as data.root)")
    parser.add_argument("--per-class", type=int, help="the first N items of each class in each split")
    parser.add_argument("--invert", action="store_true", help="dark items on white")
    args = parser.parse_args()
    with refusals():
        if Path(args.out).exists() and any(Path(args.out).iterdir()):
            raise UserError(f"{args.out} is not empty; give a new or empty folder.")
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.info("wrote %s", write_folder(args.out, args.root, args.per_class, args.invert))
