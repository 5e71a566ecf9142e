"""What the command line runs: the models a run needs first (a composite run's per-item reader), each a cached
run of its own, announced before anything starts, then the run itself (training.fit)."""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cnnrnn import checkpoint
from cnnrnn.config import Config, preset
from cnnrnn.data import fashion_mnist
from cnnrnn.ranks import process_rank
from cnnrnn.training import fit

log = logging.getLogger("cnnrnn")
LOG_FORMAT, LOG_DATEFMT = "[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"


@dataclass
class Stage:
    """A model a run needs before its own training (the per-item reader), kept in `folder` and reused; `done`
    once its metrics.json exists."""
    what: str
    cfg: Config
    folder: Path

    @property
    def done(self) -> bool:
        return (self.folder / "metrics.json").is_file()

    def describe(self) -> str:
        limit = self.cfg.data.limit
        return (f"{self.what} (task={self.cfg.task}, {self.cfg.trainer.epochs} epochs"
                f"{f' on the first {limit:,} training items' if limit else ''}) in {self.folder}: "
                + ("trained already, reused" if self.done else "trained first, then kept for every run with the "
                   "same recipe and items"))


def reader_config(cfg: Config) -> Config:
    """The per-item reader of a composite run: task=reader with the run's reader shape, on the run's items."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    model = {"channels": m["channels"], "convs": m["convs"], "hidden": m["cell_dim"]}
    trainer = {"device": t.device, "progress": t.progress, "threads": t.threads, "amp": t.amp,
               **({"epochs": cfg.reader.epochs} if cfg.reader.epochs else {})}
    data = {"root": d.root, "val_size": d.val_size, "seed": d.seed, "limit": d.limit,
            "train_eval_size": d.train_eval_size, "degrade": d.degrade}
    return preset("reader", seed=cfg.seed, model=model, trainer=trainer, data=data)


def recipe_digest(cfg: Config) -> str:
    """8 hex digits of everything that shapes a model, not where or how fast it trains. Of data.root, the folder
    the files are found in: two clones that both read the system package share their readers."""
    values = cfg.to_dict()
    values["trainer"] = {k: v for k, v in values["trainer"].items() if k not in ("device", "threads", "progress")}
    found, _ = fashion_mnist.locate(Path(cfg.data.root))
    values["data"]["root"] = str((found["train-images-idx3-ubyte"].parent if found else Path(cfg.data.root)).resolve())
    values.pop("resume")
    return hashlib.md5(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def prepare(cfg: Config, out_dir: Path) -> tuple[Config, list[Stage]]:
    """The config the run trains with and the stages it needs first: a composite run without model.init_from
    starts from a reader trained on single items (reader.train), which also serves as its tile oracle."""
    if "init_from" not in cfg.model or cfg.model["init_from"] or not cfg.reader.train:
        return cfg, []
    stage_cfg = reader_config(cfg)
    folder = (Path(cfg.reader.cache) / f"reader-{recipe_digest(stage_cfg)}" if cfg.reader.cache
              else out_dir / "reader")
    cfg = dataclasses.replace(cfg, model={**cfg.model, "init_from": str(folder / "checkpoints" / "best.pt")})
    return cfg, [Stage("the per-item reader", stage_cfg, folder)]


def run(cfg: Config, out_dir: str | Path, saved: dict | None = None, stages: list[Stage] | None = None) -> dict | None:
    """Train the stages this run needs (cached), then this run's model. Without `stages`, prepare() says which."""
    t_start = time.time()
    if stages is None:
        cfg, stages = prepare(cfg, Path(out_dir))
    for i, stage in enumerate(stages, 1):
        log.info("stage %d/%d: %s", i, len(stages) + 1, stage.describe())
        train_cached(stage.cfg, stage.folder)
    if stages:
        log.info("stage %d/%d: task=%s in %s", len(stages) + 1, len(stages) + 1, cfg.task, out_dir)
    results = fit(cfg, out_dir, saved)
    if results is not None and stages:
        log.info("done in %.0f s, the stages before included", time.time() - t_start)
    return results


def train_cached(cfg: Config, folder: Path) -> Path:
    """Train `cfg` in `folder` once: continued if it was interrupted, reused once finished; its best.pt. A lock
    makes a second process wait for the first; under torchrun rank 0 trains it alone and the others wait."""
    best, last = folder / "checkpoints" / "best.pt", folder / "checkpoints" / "last.pt"
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_path = folder.parent / f".{folder.name}.lock"
    while True:
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process training this very model: wait, then reuse it
            if (folder / "metrics.json").is_file():
                return best
            if process_rank() == 0:
                saved = checkpoint.load(last) if last.is_file() else None
                if saved is not None:
                    log.info("continuing %s", folder)
                with log_file(folder / "train.log"):
                    fit(cfg, folder, saved, distributed=False, resume_hint="the same command again")
                return best
        time.sleep(5)  # a rank other than 0: wait for rank 0 to train it


class log_file:
    """A context in which the project's log also goes to `path` (a cached model's own train.log)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
        log.addHandler(self.handler)

    def __exit__(self, *exc):
        log.removeHandler(self.handler)
        self.handler.close()
