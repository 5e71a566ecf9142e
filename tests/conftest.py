"""Shared fixtures: tiny Fashion-MNIST-shaped IDX files written by the tests (torchvision's pattern)."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnrnn.data import fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
REAL_DIRS = [ROOT / "data", ROOT / "data" / "FashionMNIST" / "raw", fashion_mnist.SYSTEM_DIR]
N_TRAIN, N_TEST = 600, 200


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: magic (0x0803 for images, 0x0801 for labels), dims, data."""
    magic = magic if magic is not None else 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable fake items: class c is a bright bar at row 2c+3 over faint noise, light on black."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c + 3: 2 * c + 6, 4:24] = 220
    return images, labels.astype(np.uint8)


def write_dataset(folder: Path, gz: bool = True) -> dict[str, bytes]:
    """The four files in `folder`; returns their decompressed bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = fake_items(N_TRAIN, 0), fake_items(N_TEST, 1)
    payloads = {"train-images-idx3-ubyte": idx_bytes(train[0]), "train-labels-idx1-ubyte": idx_bytes(train[1]),
                "t10k-images-idx3-ubyte": idx_bytes(test[0]), "t10k-labels-idx1-ubyte": idx_bytes(test[1])}
    for name, data in payloads.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return payloads


@pytest.fixture
def fake_spec(monkeypatch, tmp_path):
    """Make the loader expect the tiny fake files (their counts and checksums) and hide the system package."""
    payloads = write_dataset(tmp_path / "reference")
    files = {name: (fashion_mnist.FILES[name][0], N_TRAIN if name.startswith("train") else N_TEST,
                    hashlib.md5(data).hexdigest()) for name, data in payloads.items()}
    monkeypatch.setattr(fashion_mnist, "FILES", files)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "no-system-package")
    monkeypatch.setattr(fashion_mnist, "_download", lambda root: "offline in tests")
    return files


@pytest.fixture
def fake_root(fake_spec, tmp_path) -> Path:
    root = tmp_path / "data"
    write_dataset(root)
    return root


def real_data_available() -> bool:
    return any(all(fashion_mnist._path_in(d, n) for n in fashion_mnist.FILES) for d in REAL_DIRS)


needs_real_data = pytest.mark.skipif(
    not real_data_available(),
    reason="the real Fashion-MNIST files are absent (apt-get install dataset-fashion-mnist, or put them in data/)")


def tiny(root: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long run on the fake dataset."""
    return [f"data.root={root}", "data.val_size=100", "data.train_eval_size=100", "trainer.batch_size=50",
            "trainer.epochs=2", "trainer.progress=false", "oracle.epochs=1", "oracle.cache=null", *extra]


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


PYTHON = sys.executable


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import hydra, omegaconf, PIL.Image, sklearn.metrics, torch, torchvision  # the start-up every command pays, once
from cnnrnn import build, cli, engine, report  # not the entry modules: runpy runs those afresh as __main__

cases, running, codes = json.load(sys.stdin), {}, {}
for i, case in enumerate(cases):
    if len(running) == 2:  # two at a time: the machine's cores
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid:
        running[pid] = i
        continue
    for fd, path in ((1, case["out"]), (2, case["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv, code = [case["module"], *case["args"]], 0
    try:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:  # what the interpreter does with it on exit
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
print(json.dumps([codes[i] for i in range(len(cases))]))
"""


def run_commands(commands: list[list[str]], folder: Path) -> list[subprocess.CompletedProcess]:
    """`python -m MODULE ARGS...` for each command, as a user would run it, but forked from one interpreter that
    has imported torch & co. once: a start-up costs ~3 s of CPU, a fork ~0 (the bad-input walk runs 60+)."""
    cases = [{"module": c[0], "args": list(c[1:]), "out": str(folder / f"{i}.out"), "err": str(folder / f"{i}.err")}
             for i, c in enumerate(commands)]
    server = subprocess.run([PYTHON, "-c", FORK_SERVER], cwd=ROOT, env=cli_env(), input=json.dumps(cases),
                            capture_output=True, text=True, timeout=600)
    assert server.returncode == 0, server.stderr
    codes = json.loads(server.stdout.splitlines()[-1])
    return [subprocess.CompletedProcess([PYTHON, "-m", *c], code, Path(case["out"]).read_text(),
                                        Path(case["err"]).read_text())
            for c, case, code in zip(commands, cases, codes)]
