"""What the command line runs: the models a run needs first (a composite run's per-item reader), each a cached
run of its own, announced before anything starts, then the run itself (training.fit)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cnnrnn import build, checkpoint
from cnnrnn.cache import Cache
from cnnrnn.config import Config, preset
from cnnrnn.data import sources
from cnnrnn.errors import UserError
from cnnrnn.ranks import process_rank
from cnnrnn.training import fit

log = logging.getLogger("cnnrnn")
LOG_FORMAT, LOG_DATEFMT = "[%(asctime)s][%(levelname)s] %(message)s", "%H:%M:%S"


@dataclass
class Stage:
    """A model a run needs before its own training (the per-item reader): entry `name` of `cache`, trained in
    its partial folder (continued if interrupted) and published whole once finished."""
    what: str
    cfg: Config
    cache: Cache
    name: str
    hint: str  # how to continue it after a stop

    @property
    def folder(self) -> Path:
        return self.cache.entry(self.name)

    @property
    def done(self) -> bool:
        return self.cache.done(self.name)

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
    data = {k: getattr(d, k) for k in ("source", "path", "root", "kind", "label_sep", "size", "channels", "skip_bad",
                                       "cache", "val_size", "seed", "limit", "train_eval_size", "hflip", "degrade")}
    return preset("reader", seed=cfg.seed, model=model, trainer=trainer, data=data)


def recipe_digest(cfg: Config) -> str:
    """8 hex digits of everything that shapes a model, not where or how fast it trains, and of the data it reads
    (sources.fingerprint): two clones that read the same files share their readers, two datasets never do."""
    values = cfg.to_dict()
    values["trainer"] = {k: v for k, v in values["trainer"].items() if k not in ("device", "threads", "progress")}
    values["data"]["root"] = values["data"]["path"] = sources.fingerprint(cfg.data)
    values["data"].pop("cache")
    values.pop("resume")
    return hashlib.md5(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def prepare(cfg: Config, out_dir: Path) -> tuple[Config, list[Stage]]:
    """The config the run trains with and the stages it needs first: a composite run without model.init_from
    starts from a reader trained on single items (reader.train), which also serves as its tile oracle."""
    if "init_from" not in cfg.model or not cfg.reader.train or not sources.has_items(cfg.data):
        return cfg, []  # no reader stage: asked so, or pictures without items to train it on
    stage_cfg = reader_config(cfg)
    cache, name = ((Cache(cfg.reader.cache, "reader.cache"), f"reader-{recipe_digest(stage_cfg)}") if cfg.reader.cache
                   else (Cache(out_dir, "the run folder"), "reader"))
    best = str(cache.entry(name) / "checkpoints" / "best.pt")
    if cfg.model["init_from"] not in (None, best):  # a reader of the user's: no stage (its own stage's: as null)
        return cfg, []
    hint = "the same command again" if cfg.reader.cache else f"resume={out_dir}"
    return dataclasses.replace(cfg, model={**cfg.model, "init_from": best}), [
        Stage("the per-item reader", stage_cfg, cache, name, hint)]


def check(cfg: Config) -> None:
    """Before the run folder exists: the reader cache can serve or keep this run's reader, and a cached one reads."""
    _, needed = prepare(cfg, Path("."))
    for stage in needed:
        if cfg.reader.cache:
            stage.cache.check(stage.name)
            if stage.done:
                cached_reader(stage)


def cached_reader(stage: Stage) -> Path:
    """The best.pt of a finished stage, read through the checks of any checkpoint; a sentence naming the cache
    entry (and how to rebuild it) if it is damaged or not a reader."""
    best = stage.folder / "checkpoints" / "best.pt"
    try:
        build.reader_model(best, what="the cached reader")
    except UserError as exc:
        raise UserError(f"The cached reader in {stage.folder} cannot be used ({str(exc).rstrip('.')}); delete that "
                        f"folder and the next run trains it again.") from None
    return best


def run(cfg: Config, out_dir: str | Path, saved: dict | None = None, stages: list[Stage] | None = None) -> dict | None:
    """Train the stages this run needs (cached), then this run's model. Without `stages`, prepare() says which."""
    t_start = time.time()
    if stages is None:
        cfg, stages = prepare(cfg, Path(out_dir))
    for i, stage in enumerate(stages, 1):
        log.info("stage %d/%d: %s", i, len(stages) + 1, stage.describe())
        train_stage(stage)
    if stages:
        log.info("stage %d/%d: task=%s in %s", len(stages) + 1, len(stages) + 1, cfg.task, out_dir)
    results = fit(cfg, out_dir, saved)
    if results is not None and stages:
        log.info("done in %.0f s, the stages before included", time.time() - t_start)
    return results


def train_stage(stage: Stage) -> Path:
    """Train a stage once, in its cache entry's partial folder (continued if it was interrupted), and publish it
    whole; reuse it once published. A second process waits for the first; under torchrun rank 0 trains it alone
    and the others wait. Its best.pt, checked."""
    while not stage.done:
        if process_rank() == 0:
            with stage.cache.building(stage.name) as partial:
                if partial is not None:
                    last = partial / "checkpoints" / "last.pt"
                    saved = checkpoint.load(last) if last.is_file() else None
                    if saved is not None:
                        log.info("continuing %s", partial)
                    with log_file(partial / "train.log"):
                        fit(stage.cfg, partial, saved, distributed=False, resume_hint=stage.hint)
        else:
            time.sleep(5)  # a rank other than 0: wait for rank 0 to train it
    return cached_reader(stage)


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
