"""Shared fixtures and helpers: fake Fashion-MNIST files, small configs, runs trained once, command lines."""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea

from cnnrnn import build, checkpoint
from cnnrnn.config import Config, preset
from cnnrnn.data import fashion_mnist
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import FORMAT
from cnnrnn.tasks import Classification, LabelSequence, MultiLabelBCE

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
REAL_DIRS = [ROOT / "data", ROOT / "data" / "FashionMNIST" / "raw", fashion_mnist.SYSTEM_DIR]
N_TRAIN, N_TEST = 600, 200
COMPOSITE_TASKS = ("multilabel", "multilabel_bce")


# --- the fake dataset -----------------------------------------------------------------------------------------

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


@pytest.fixture(scope="session")
def fake_dataset(tmp_path_factory) -> tuple[Path, dict]:
    """The fake files, written once a session (never write into them), and the spec the loader expects."""
    base = tmp_path_factory.mktemp("fake-fashion-mnist")
    payloads = write_dataset(base / "data")
    files = {name: (fashion_mnist.FILES[name][0], N_TRAIN if name.startswith("train") else N_TEST,
                    hashlib.md5(data).hexdigest()) for name, data in payloads.items()}
    return base / "data", files


def _expect_fake_files(patch, files: dict, nowhere: Path) -> None:
    patch.setattr(fashion_mnist, "FILES", files)
    patch.setattr(fashion_mnist, "SYSTEM_DIR", nowhere / "no-system-package")
    patch.setattr(fashion_mnist, "_download", lambda root: "offline in tests")


@pytest.fixture
def fake_spec(monkeypatch, fake_dataset, tmp_path) -> dict:
    """Make the loader expect the tiny fake files (their counts and checksums) and hide the system package."""
    _expect_fake_files(monkeypatch, fake_dataset[1], tmp_path)
    return fake_dataset[1]


@pytest.fixture
def fake_root(fake_spec, fake_dataset) -> Path:
    """The folder of the fake files (shared by the session: never write into it)."""
    return fake_dataset[0]


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread: as fast for tiny models, and far faster on cores busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def onnx_ready():
    """Skip where the [export] extras (onnx, onnxruntime) are not installed."""
    reason = "the [export] extras are not installed: pip install 'cnnrnn[export]'"
    pytest.importorskip("onnx", reason=reason)
    pytest.importorskip("onnxruntime", reason=reason)


def real_data_available() -> bool:
    return any(all(fashion_mnist._path_in(d, n) for n in fashion_mnist.FILES) for d in REAL_DIRS)


needs_real_data = pytest.mark.skipif(
    not real_data_available(),
    reason="the real Fashion-MNIST files are absent (apt-get install dataset-fashion-mnist, or put them in data/)")


# --- small configs ----------------------------------------------------------------------------------------------

SMALL_MODELS = {
    "lstm": {"hidden": 16},
    "lstm2": {"hidden": 16},
    "cnn": {"channels": [4, 8], "hidden": 16},
    "reader": {"channels": [4, 8], "hidden": 16},
    "multilabel": {"channels": [4, 8], "cell_dim": 16, "embed": 8, "hidden": 32, "attn_dim": 16},
    "multilabel_bce": {"channels": [4, 8], "cell_dim": 16},
}


def tiny_groups(root: Path, task: str) -> dict:
    """The groups tiny() changes: a seconds-long run on the fake data."""
    groups = {"data": {"root": str(root), "val_size": 100, "train_eval_size": 100},
              "trainer": {"batch_size": 50, "epochs": 2, "progress": False},
              "model": dict(SMALL_MODELS[task])}
    if task in COMPOSITE_TASKS:
        groups["data"]["test_size"] = 100
        groups["reader"] = {"epochs": 1, "cache": str(Path(root).parent / "readers")}
    return groups


def tiny(root: Path, task: str, **groups) -> Config:
    """A small validated Config of `task` for seconds-long runs on the fake data, changed by `groups`."""
    merged = tiny_groups(root, task)
    for group, keys in groups.items():
        if isinstance(keys, dict):
            merged[group] = {**merged.get(group, {}), **keys}
        else:
            merged[group] = keys
    return preset(task, **merged)


def _cli_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    return str(value)


def tiny_args(root: Path, *extra: str) -> list[str]:
    """tiny()'s config as command-line overrides (task from a task=NAME in `extra`, else multilabel), then `extra`."""
    task = next((a.split("=", 1)[1] for a in extra if a.startswith("task=")), "multilabel")
    args = [f"task={task}"]
    for group, keys in tiny_groups(root, task).items():
        args += [f"{group}.{k}={_cli_value(v)}" for k, v in keys.items()]
    return [*args, *(a for a in extra if not a.startswith("task="))]


def write_checkpoint(path: Path, task: str, root: Path, bias: dict[int, float] | None = None, seed: int = 0,
                     task_state: dict | None = None, **groups) -> tuple[Config, torch.nn.Module]:
    """An untrained, complete, seeded checkpoint of tiny(root, task, **groups); `bias`: decoder output biases."""
    cfg = tiny(root, task, **groups)
    torch.manual_seed(seed)
    model = build.model(cfg, FORMAT)
    if bias:
        with torch.no_grad():
            for index, value in bias.items():
                model.out.bias[index] = value
    model.eval()
    checkpoint.save(path, {"model": model.state_dict(), "config": cfg.to_dict(), "items": FORMAT.to_dict(),
                           "task_state": task_state or {}})
    return cfg, model


def composites(root: Path, n: int = 12, grid: int = 2, **kwargs) -> dict[str, torch.Tensor]:
    """n fixed composites of the fake test items."""
    data = fashion_mnist.splits(root, val_size=100)
    src = CompositeSource(data["test"], n, grid=grid, min_items=1, max_items=min(4, grid * grid), seed=4, fixed=True,
                          **kwargs)
    return src.batch(src.order(None))


def make_composites(split, size: int, grid: int = 2, min_items: int = 1, max_items: int | None = None, seed: int = 0,
                    **kwargs) -> CompositeSource:
    """A CompositeSource with the main job's composite settings unless given."""
    return CompositeSource(split, size, grid, min_items, min(4, grid * grid) if max_items is None else max_items, seed,
                           **kwargs)


def single_task(tta: bool = False) -> Classification:
    return Classification(FORMAT, 0.0, tta)


def bce_task(threshold: float = 0.5, tta: bool = False) -> MultiLabelBCE:
    return MultiLabelBCE(FORMAT, threshold, tta, 0.0)


def sequence_task(order: str = "frequency", class_counts=None, tta: bool = False, target: str = "set",
                  max_items: int | None = None) -> LabelSequence:
    return LabelSequence(FORMAT, order, class_counts, 0.0, tta, target, max_items)


# --- runs trained once a session (read them, never change them) --------------------------------------------------

def train_once(fake_dataset, tmp_path_factory, name: str, cfg_of, run=None) -> tuple[Path, object]:
    """(run dir, run(cfg, out)) of `cfg_of(fake root)` in a new folder, the fake files expected meanwhile only."""
    from cnnrnn import stages

    with pytest.MonkeyPatch.context() as patch:
        _expect_fake_files(patch, fake_dataset[1], tmp_path_factory.mktemp("nowhere"))
        out = tmp_path_factory.mktemp(name) / "run"
        return out, (run or stages.run)(cfg_of(fake_dataset[0]), out)


@pytest.fixture(scope="session")
def cnn_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny task=cnn run that learns the fake data: (run dir, test metrics)."""
    return train_once(fake_dataset, tmp_path_factory, "cnn", lambda root: tiny(root, "cnn", optim={"lr": 1e-2}))


@pytest.fixture(scope="session")
def multilabel_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny task=multilabel run (its reader trained first, in the session's reader cache)."""
    return train_once(fake_dataset, tmp_path_factory, "multilabel", lambda root: tiny(root, "multilabel"))


@pytest.fixture(scope="session")
def bce_run(fake_dataset, tmp_path_factory) -> tuple[Path, dict]:
    """A finished tiny task=multilabel_bce run."""
    return train_once(fake_dataset, tmp_path_factory, "bce", lambda root: tiny(root, "multilabel_bce"))


# --- reading what a run wrote -----------------------------------------------------------------------------------

def tags(run_dir: Path) -> dict[str, list]:
    """The TensorBoard tags of a run, by kind (scalars, images, ...)."""
    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc.Tags()


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point of a TensorBoard scalar."""
    acc = ea.EventAccumulator(str(run_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file below a folder, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(err: str) -> str:
    """The one error line of a refusal's stderr (and no traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, err
    return errors[0]


# --- entry points ---------------------------------------------------------------------------------------------

def run_main(capsys, main, *args) -> tuple[int, str, str]:
    """An entry point's main(argv) in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def half_writer(error: BaseException):
    """A stand-in for open() whose file takes half the bytes of a write, then raises `error` (a kill, a full disk)."""
    real_open = open

    class HalfWriter:
        def __init__(self, name, mode):
            self.f = real_open(name, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise error

    return HalfWriter


@contextlib.contextmanager
def entry_point_state(cwd: Path):
    """Run an entry point in this process from `cwd`: cwd, signal and log handlers are restored after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    before, level, previous = list(root.handlers), root.level, os.getcwd()
    os.chdir(cwd)
    try:
        yield cwd
    finally:
        os.chdir(previous)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for handler in root.handlers:
            if handler not in before:
                handler.close()
        root.handlers[:] = before
        root.setLevel(level)


@pytest.fixture
def in_process(tmp_path):
    """For entry points called in this process: cwd is tmp_path; signal and log handlers are restored after."""
    with entry_point_state(tmp_path) as cwd:
        yield cwd


def cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return env


def cli(*args, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ARGS...` as a user runs it."""
    return subprocess.run([PYTHON, "-m", *map(str, args)], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


FORK_SERVER = r"""
import json, os, runpy, sys, traceback
import hydra, omegaconf, PIL.Image, sklearn.metrics, torch, torchvision  # the start-up every command pays, once
from cnnrnn import build, checkpoint, engine, inference, shell, training  # not the entry modules: runpy runs those

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


def run_commands(commands: list[list[str]], folder: Path, cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """`python -m MODULE ARGS...` for each command in `cwd`, forked from one interpreter that imported torch once."""
    cases = [{"module": c[0], "args": list(c[1:]), "out": str(folder / f"{i}.out"), "err": str(folder / f"{i}.err")}
             for i, c in enumerate(commands)]
    server = subprocess.run([PYTHON, "-c", FORK_SERVER], cwd=cwd, env=cli_env(), input=json.dumps(cases),
                            capture_output=True, text=True, timeout=600)
    assert server.returncode == 0, server.stderr
    codes = json.loads(server.stdout.splitlines()[-1])
    return [subprocess.CompletedProcess([PYTHON, "-m", *c], code, Path(case["out"]).read_text(),
                                        Path(case["err"]).read_text())
            for c, case, code in zip(commands, cases, codes)]
