"""A user's labelled pictures: a folder of class folders (torchvision's ImageFolder layout, optionally under
train/, val/, test/) or a CSV of files and labels. Listed and checked (one sentence for what is wrong), decoded in
worker processes, converted to the run's format (data.pictures), split, and described by a Format."""
from __future__ import annotations

import concurrent.futures as cf
import csv
import functools
import hashlib
import io
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnrnn.cache import Cache
from cnnrnn.data import pictures
from cnnrnn.data.items import Format, Split, stratified
from cnnrnn.errors import UserError
from cnnrnn.files import write_atomic

log = logging.getLogger("cnnrnn")
SPLITS = ("train", "val", "test")
FILE_COLUMNS = ("file", "file_name", "fname", "filename")


@dataclass
class Listing:
    """The pictures of a folder or CSV: the file of each as written (relative to data.path's folder), its path, its
    labels and its split (None: to be drawn), and whether it is a CSV of multi-label pictures."""
    files: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    pictures: bool = False

    def add(self, file: str, path: Path, labels: tuple[str, ...], split: str | None) -> None:
        self.files.append(file)
        self.paths.append(path)
        self.labels.append(labels)
        self.splits.append(split)


def list_folder(root: Path) -> Listing:
    """One subfolder per class, under train/, val/, test/ where they exist; other entries ignored with a warning."""
    if not root.is_dir():
        raise UserError(f"data.path={root} is not a folder; give a folder of class folders or a CSV file.")
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    splits = {p.name: p for p in entries if p.is_dir() and p.name in SPLITS}
    tops = list(splits.items()) if splits else [(None, root)]
    ignored = [p.name for p in entries if p.name not in splits] if splits else [p.name for p in entries if p.is_file()]
    listing = Listing()
    for split, top in tops:
        for folder in sorted(p for p in top.iterdir() if not p.name.startswith(".")):
            if not folder.is_dir():
                ignored.append(str(folder.relative_to(root)))
                continue
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in pictures.EXTENSIONS
                           and not p.name.startswith("."))
            if not files:
                raise UserError(f"{folder} is a class folder with no pictures ({', '.join(sorted(pictures.EXTENSIONS))}"
                                f"); add pictures of {folder.name} or remove the folder.")
            for path in files:
                listing.add(str(path.relative_to(root)), path, (folder.name,), split)
    if ignored:
        log.warning("data.path=%s: %s ignored (not a class folder%s)", root, ", ".join(ignored[:5]) + (
            f" and {len(ignored) - 5} more" if len(ignored) > 5 else ""), " nor train/, val/, test/" if splits else "")
    if not listing.files:
        raise UserError(f"data.path={root} holds no class folders of pictures; make one folder per class "
                        f"(docs/your-data.md).")
    return listing


def list_csv(path: Path, sep: str, kind: str) -> Listing:
    """A header row, a file column, `labels` and an optional `split`; one kind as a whole (items or pictures)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise UserError(f"data.path={path} is not UTF-8 text; save the CSV as UTF-8.") from None
    except (OSError, csv.Error) as exc:
        raise UserError(f"data.path={path} cannot be read as a CSV ({exc}); give a CSV file with a header "
                        f"row.") from None
    columns = set(rows[0]) if rows else set()
    name = next((c for c in FILE_COLUMNS if c in columns), None)
    if name is None or "labels" not in columns:
        raise UserError(f"data.path={path} needs a header row with a file column ({', '.join(FILE_COLUMNS)}) and "
                        f"'labels'; it has {', '.join(sorted(c for c in columns if c)) or 'none'}.")
    listing, seen = Listing(), {}
    for i, row in enumerate(rows, 2):  # line numbers as an editor shows them: the header is line 1
        file, split = (row[name] or "").strip(), (row.get("split") or "").strip() or None
        labels = tuple(label for label in (row["labels"] or "").strip().split(sep or None) if label)
        if file in seen:
            raise UserError(f"data.path={path}: lines {seen[file]} and {i} both name {file}; keep one row per file.")
        if split not in (None, *SPLITS):
            raise UserError(f"data.path={path}, line {i}: split '{split}' must be train, val or test (or empty).")
        target = Path(file) if os.path.isabs(file) else path.parent / file
        if not file or not target.is_file():
            raise UserError(f"data.path={path}, line {i}: the file '{file}' does not exist (paths are relative to "
                            f"the CSV's folder); fix the row or remove it.")
        seen[file] = i
        listing.add(file, target, labels, split)
    if not listing.files:
        raise UserError(f"data.path={path} has no rows; add one row per picture.")
    listing.pictures = kind == "pictures" or kind == "auto" and any(len(labels) > 1 for labels in listing.labels)
    empty = next((i for i, labels in enumerate(listing.labels, 2) if not labels), None)
    if not listing.pictures and empty is not None:
        raise UserError(f"data.path={path}, line {empty}: an item with no label; give it its class, or set "
                        f"data.kind=pictures if the rows are pictures that may hold nothing.")
    return listing


def listing_of(d) -> Listing:
    path = Path(d.path)
    return list_folder(path) if d.source == "folder" else list_csv(path, d.label_sep, d.kind)


def fingerprint(d, listing: Listing | None = None) -> str:
    """A digest of the files (names, sizes, times of change), their labels and splits, and the CSV: what a cache of
    their pictures, or a reader trained on them, is valid for."""
    listing = listing or listing_of(d)
    h = hashlib.sha256(str(Path(d.path).resolve()).encode())
    for file, path, labels, split in zip(listing.files, listing.paths, listing.labels, listing.splits):
        stat = path.stat()
        h.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0{'|'.join(labels)}\0{split}\n".encode())
    return h.hexdigest()[:16]


def decode(paths: list[Path], size: int, channels: int, skip_bad: bool) -> tuple[list, list[int]]:
    """Every file decoded and fitted (longer side `size`), in worker processes, with a progress bar and its rate;
    the pictures and the indices of those that were skipped as unreadable (data.skip_bad)."""
    from tqdm import tqdm

    from cnnrnn.ranks import cores

    chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
    t = time.time()
    fitted, bad = [], []
    with cf.ProcessPoolExecutor(max(1, min(cores(), len(chunks))), multiprocessing.get_context("fork"),
                                initializer=_quiet) as pool, tqdm(total=len(paths), desc="decoding pictures",
                                                                  unit="file", leave=False, disable=None) as bar:
        work = functools.partial(_decode_chunk, size=size, channels=channels)
        for chunk, result in zip(chunks, pool.map(work, chunks)):
            for item in result:
                if isinstance(item, str):
                    if not skip_bad:
                        raise UserError(f"{item.rstrip('.')}; fix or remove it, or set data.skip_bad=true to "
                                        f"leave out the files that cannot be read.")
                    bad.append(len(fitted) + len(bad))
                else:
                    fitted.append(item)
            bar.update(len(chunk))
    log.info("decoded %d files in %.1f s (%.0f files/s)", len(paths), time.time() - t,
             len(paths) / max(time.time() - t, 1e-9))
    return fitted, bad


def _quiet() -> None:
    import cv2

    cv2.setNumThreads(1)  # one process per core already


def _decode_chunk(paths: list[Path], size: int, channels: int) -> list:
    out = []
    for path in paths:
        try:
            out.append(pictures.fit(pictures.read(path, channels, warn=lambda message: None), size))
        except UserError as exc:
            out.append(str(exc))
    return out


def held_out(n: int, classes: int, val_size) -> int:
    """data.val_size as a count of n items: a count, a share, or null (10%, at least one per class, at most 5,000)."""
    if val_size is None:
        return min(5000, max(classes, round(0.1 * n)))
    return round(val_size * n) if isinstance(val_size, float) else int(val_size)


def assign(listing: Listing, classes: int, d) -> list[str]:
    """Each picture's split: as given by the folders or the CSV, else held out, stratified, fixed by data.seed
    (validation from the training pictures when only val is missing, test too when it is)."""
    given, keys = list(listing.splits), ["|".join(labels) for labels in listing.labels]
    if None in given and set(given) != {None}:
        line = given.index(None) + 2
        raise UserError(f"data.path={d.path}, line {line}: no split while other rows have one; give every row its "
                        f"split, or none.")
    if set(given) == {None}:
        given = ["train"] * len(given)
    if "train" not in given:
        raise UserError(f"data.path={d.path} has no training pictures (train/ or split=train); add them.")
    taught = {label for s, labels in zip(given, listing.labels) if s == "train" for label in labels}
    missing = sorted({label for labels in listing.labels for label in labels} - taught)
    if missing:
        raise UserError(f"data.path={d.path}: no training pictures of {', '.join(missing)}; add some, or remove the "
                        f"class.")
    for split, size in (("test", None), ("val", d.val_size)):
        if split in listing.splits:
            continue
        train = [i for i, s in enumerate(given) if s == "train"]
        count = held_out(len(train), classes, size)
        _, drawn = stratified([keys[i] for i in train], count, d.seed, split)
        for j in drawn:
            given[train[j]] = split
    return given


def load(d):
    """{'train', 'val', 'test'} Splits of a user's folder or CSV (data.source, data.path) and their Format: decoded
    once, then read from data.cache (an entry per files, conversion and split; null: decoded every time)."""
    started = time.time()
    listing = listing_of(d)
    classes = sorted({label for labels in listing.labels for label in labels})
    if len(classes) < 2:
        raise UserError(f"data.path={d.path} names a single class ({', '.join(classes) or 'none'}); a classifier needs "
                        f"at least two.")
    if len(listing.files) * d.channels * d.size ** 2 > 16 * 2 ** 30:
        raise UserError(f"data.path={d.path}: {len(listing.files):,} pictures of {d.size}x{d.size}x{d.channels} "
                        f"would take more than 16 GiB; lower data.size or use fewer pictures.")
    if d.cache:
        splits, fmt = cached(d, listing, classes)
    else:
        splits, fmt = convert(d, listing, classes)
    if d.limit is not None:
        splits["train"] = splits["train"].subset(range(min(d.limit, len(splits["train"]))))
    log.info("data.path=%s: %s pictures of %d classes (train %d, val %d, test %d), background tone %s; ready in "
             "%.1f s", d.path, f"{sum(len(s) for s in splits.values()):,}", len(classes),
             *(len(splits[s]) for s in SPLITS), fmt.background, time.time() - started)
    return splits, fmt


def cache_key(d, listing: Listing) -> str:
    """The entry of data.cache that holds these pictures: their files, the conversion and the split."""
    settings = (fingerprint(d, listing), d.size, d.picture_size, d.channels, d.skip_bad, d.val_size, d.seed, d.kind,
                d.label_sep)
    return "pictures-" + hashlib.sha256(repr(settings).encode()).hexdigest()[:16]


def cached(d, listing: Listing, classes: list[str]):
    """The splits and format of data.cache's entry for these pictures, built first if missing (one process
    builds it, the others wait), read checked."""
    cache, key = Cache(d.cache, "data.cache"), cache_key(d, listing)
    if not cache.done(key):
        with cache.building(key) as partial:
            if partial is not None:
                splits, fmt = convert(d, listing, classes)
                data = io.BytesIO()
                torch.save({"key": key, "items": fmt.to_dict(), "splits": {name: {
                    "images": s.images, "labels": s.labels, "files": s.files} for name, s in splits.items()}}, data)
                write_atomic(partial / "pictures.pt", data.getvalue(), what="the cache of pictures",
                             then="free space, then run it again")
    path = cache.entry(key) / "pictures.pt"
    try:
        entry = torch.load(path, weights_only=True, mmap=True)
        splits = {name: Split(**entry["splits"][name]) for name in SPLITS}
        fmt = Format.from_dict(entry["items"])
        assert entry["key"] == key and list(fmt.classes) == classes
        side = fmt.picture or d.size
        assert all(s.images.shape[1:] == (d.channels, side, side) and len(s.labels) == len(s.files)
                   for s in splits.values())
    except Exception as exc:  # any damage: torch's, a missing field, a wrong shape
        raise UserError(f"The cached pictures in {cache.entry(key)} cannot be used ({type(exc).__name__}); delete "
                        f"that folder and the next run decodes the pictures again.") from None
    log.info("pictures from %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return splits, fmt


def convert(d, listing: Listing, classes: list[str]):
    """Decode, fit, split and pad every picture (items to data.size, multi-label pictures to data.picture_size);
    the splits and their Format (the background tone, mean and spread of the training pictures)."""
    side = d.picture_size if listing.pictures else d.size
    split_of = assign(listing, len(classes), d)
    fitted, bad = decode(listing.paths, side, d.channels, d.skip_bad)
    if bad:
        log.warning("data.skip_bad: %d files that cannot be read left out, e.g. %s", len(bad), listing.paths[bad[0]])
    keep = [i for i in range(len(listing.files)) if i not in set(bad)]
    train = [k for k, i in enumerate(keep) if split_of[i] == "train"]
    tone = pictures.background([fitted[k] for k in train])
    images = np.stack([pictures.pad(a, side, tone) for a in fitted]).transpose(0, 3, 1, 2)  # (N, H, W, C) -> NCHW
    pixels = images[train].reshape(len(train), d.channels, -1) / 255.0
    fmt = Format(tuple(classes), d.size, d.channels, tuple(pixels.mean(axis=(0, 2)).tolist()),
                 tuple(np.maximum(pixels.std(axis=(0, 2)), 1e-3).tolist()), tone,
                 picture=side if listing.pictures else 0)
    index = {name: i for i, name in enumerate(classes)}
    splits = {}
    for split in SPLITS:
        rows = [k for k, i in enumerate(keep) if split_of[i] == split]
        if listing.pictures:  # label sets (N, K); a picture may hold nothing
            labels = torch.zeros(len(rows), len(classes))
            for r, k in enumerate(rows):
                labels[r, [index[name] for name in listing.labels[keep[k]]]] = 1.0
        else:
            labels = torch.tensor([index[listing.labels[keep[k]][0]] for k in rows], dtype=torch.long)
        splits[split] = Split(torch.from_numpy(np.ascontiguousarray(images[rows])), labels,
                              [listing.files[keep[k]] for k in rows])
    return splits, fmt


def load_test(path: Path, fmt, label_sep: str = " "):
    """The test pictures of another labelled folder or CSV (its test/ folder or split=test rows, else all of them),
    converted to `fmt` (a trained model's) and labelled with its class indices; their names must be its names."""
    listing = list_folder(path) if path.is_dir() else list_csv(path, label_sep, "items")
    names = sorted({label for labels in listing.labels for label in labels})
    if not set(names) <= set(fmt.classes):
        raise UserError(f"--data {path} names the classes {', '.join(names)}, but the model knows "
                        f"{', '.join(fmt.classes)}; give data of the model's classes.")
    rows = [i for i, s in enumerate(listing.splits) if s == "test"] or list(range(len(listing.files)))
    fitted, _ = decode([listing.paths[i] for i in rows], fmt.size, fmt.channels, skip_bad=False)
    images = np.stack([pictures.pad(a, fmt.size, fmt.background) for a in fitted]).transpose(0, 3, 1, 2)
    labels = torch.tensor([fmt.classes.index(listing.labels[i][0]) for i in rows], dtype=torch.long)
    return Split(torch.from_numpy(np.ascontiguousarray(images)), labels, [listing.files[i] for i in rows])
