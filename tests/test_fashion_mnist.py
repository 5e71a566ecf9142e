"""The IDX files: validation, search order, the download's failure, the validation split."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    N_TEST,
    N_TRAIN,
    fake_items,
    idx_bytes,
    needs_real_data,
    write_dataset,
)

from cnnrnn.data import fashion_mnist as fm
from cnnrnn.errors import UserError


def parse(data: bytes, magic: int = 2051, count: int = 5):
    return fm.parse_idx(data, Path("x-idx3-ubyte"), magic, count)


def test_parse_valid_images_and_labels():
    images, labels = fake_items(5, 0)
    assert torch.equal(parse(idx_bytes(images)), torch.from_numpy(images))
    assert parse(idx_bytes(labels), magic=2049).tolist() == labels.tolist()


@pytest.mark.parametrize("data, message", [
    (idx_bytes(fake_items(5, 0)[0])[:-10], "truncated"),
    (idx_bytes(fake_items(5, 0)[0])[:7], "truncated"),
    (idx_bytes(fake_items(5, 0)[0]) + b"\0", "longer than its header"),
    (idx_bytes(fake_items(5, 0)[0], magic=2049), "magic number 2049"),
    (idx_bytes(fake_items(4, 0)[0]), "holds 4 items, expected 5"),
    (idx_bytes(np.zeros((5, 32, 32), np.uint8)), "32x32 images"),
])
def test_parse_refuses_bad_images(data, message):
    with pytest.raises(UserError, match=message):
        parse(data)


def test_parse_refuses_labels_out_of_range():
    labels = np.array([0, 3, 10, 1, 2], np.uint8)
    with pytest.raises(UserError, match="label 10, outside 0..9"):
        parse(idx_bytes(labels), magic=2049)


def test_read_checks_content_checksum(fake_spec, tmp_path):
    """A file of the right shape but other content (say, MNIST's) is refused by its MD5."""
    root = tmp_path / "d"
    write_dataset(root, gz=False)
    images, labels = fake_items(N_TRAIN, 0)
    labels = (labels + 1) % 10
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte has the right shape but not Fashion-MNIST"):
        fm.load(root)


def test_load_reads_gz_and_raw_alike(fake_spec, tmp_path):
    write_dataset(tmp_path / "gz", gz=True)
    write_dataset(tmp_path / "raw", gz=False)
    a, b = fm.load(tmp_path / "gz"), fm.load(tmp_path / "raw")
    assert a["train"].images.shape == (N_TRAIN, 1, 28, 28) and a["train"].images.dtype == torch.uint8
    assert a["test"].labels.shape == (N_TEST,) and a["test"].labels.dtype == torch.int64
    assert torch.equal(a["train"].images, b["train"].images)


def test_search_order_root_then_torchvision_layout_then_system(fake_spec, tmp_path, monkeypatch):
    root, system = tmp_path / "root", tmp_path / "system"
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    write_dataset(system)
    assert fm.locate(root)[0]["t10k-images-idx3-ubyte"].parent == system
    write_dataset(root / "FashionMNIST" / "raw")
    assert fm.locate(root)[0]["t10k-images-idx3-ubyte"].parent == root / "FashionMNIST" / "raw"
    write_dataset(root)
    assert fm.locate(root)[0]["t10k-images-idx3-ubyte"].parent == root


def test_a_bad_file_is_an_error_not_a_reason_to_look_further(fake_spec, tmp_path, monkeypatch):
    root, system = tmp_path / "root", tmp_path / "system"
    monkeypatch.setattr(fm, "SYSTEM_DIR", system)
    write_dataset(system)
    write_dataset(root)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(idx_bytes(fake_items(N_TEST, 1)[0])[:1000])
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte.gz is truncated"):
        fm.load(root)


def test_missing_everywhere_lists_each_place_and_the_remedies(fake_spec, tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(UserError) as err:
        fm.load(tmp_path / "root")
    message = str(err.value)
    assert "1 of 4 files" in message and "FashionMNIST/raw (not there)" in message
    assert "no-system-package" in message and "offline in tests" in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_split_is_stratified_disjoint_and_fixed(fake_spec, fake_root):
    s = fm.splits(fake_root, val_size=100, limit=None)
    assert len(s["val"]) == 100 and len(s["train"]) == N_TRAIN - 100 and len(s["test"]) == N_TEST
    assert torch.bincount(s["val"].labels, minlength=10).tolist() == [10] * 10
    again = fm.splits(fake_root, val_size=100, limit=None)
    assert torch.equal(s["val"].images, again["val"].images)
    train_rows = {bytes(x.numpy()) for x in s["train"].images}
    assert not any(bytes(x.numpy()) in train_rows for x in s["val"].images)


def test_limit_cuts_the_training_part_only(fake_spec, fake_root):
    s = fm.splits(fake_root, val_size=100, limit=50)
    assert len(s["train"]) == 50 and len(s["val"]) == 100


def test_val_size_larger_than_the_training_set_is_refused(fake_spec, fake_root):
    with pytest.raises(UserError, match="data.val_size=600 must hold between 10 and 590 items"):
        fm.splits(fake_root, val_size=600)


def test_a_failed_download_says_why_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    """The sentence carries the download error's cause, and the folders made for it are removed."""
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            (Path(root) / "FashionMNIST" / "raw").mkdir(parents=True, exist_ok=True)  # as torchvision does first
            try:
                raise OSError("[Errno -3] Temporary failure in name resolution")
            except OSError as cause:
                raise RuntimeError("Error downloading train-images-idx3-ubyte.gz") from cause

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "no-system-package")
    (tmp_path / "project").mkdir()
    root = tmp_path / "project" / "data"
    with pytest.raises(UserError) as err:
        fm.load(root)
    message = str(err.value)
    assert "RuntimeError: Error downloading train-images-idx3-ubyte.gz, caused by OSError: [Errno -3] Temporary " \
           "failure in name resolution" in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message
    assert not root.exists() and (tmp_path / "project").is_dir()  # what the download made is removed, no more


@needs_real_data
def test_real_files_validate():
    data = fm.load(Path(__file__).resolve().parent.parent / "data", download=False)
    assert len(data["train"]) == 60000 and len(data["test"]) == 10000
    assert torch.bincount(data["test"].labels).tolist() == [1000] * 10
