"""Train one model: set up, then per epoch train, validate and checkpoint, then test the best checkpoint once.

No Hydra here: `fit(cfg, out_dir)` takes a typed Config and a folder, so a notebook trains a model in two lines
(docs/python.md). What a run needs trained before it (a composite run's per-item reader) is stages.py's.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cnnrnn import build, checkpoint, viz
from cnnrnn.config import MODEL_OF, Config
from cnnrnn.data import sources
from cnnrnn.data.composite import CellFeatures
from cnnrnn.data.loader import batches, num_batches
from cnnrnn.data.scene import format_statistics
from cnnrnn.data.sources import Sources
from cnnrnn.engine import NonFiniteLoss, autocast, ema_update, keep_freed_memory, score, train_steps
from cnnrnn.errors import UserError
from cnnrnn.files import strict_json, write_atomic
from cnnrnn.models import MODELS, count_params
from cnnrnn.models.cnn import SmallCNN
from cnnrnn.ranks import Process, Stopped, StopSignals, gather_rng, restore_rng, seed_everything, start_process
from cnnrnn.report import duration
from cnnrnn.tasks import MULTI_SCALARS, Task, TileOracle, make_task

log = logging.getLogger("cnnrnn")
ALL_TEST_SCALARS = ("acc", *MULTI_SCALARS)  # every run declares these to TensorBoard's HParams table


@dataclass
class TrainState:
    """The loop's progress, saved in every checkpoint; the step within an epoch is global_step's remainder. A run
    is finished once its metrics.json exists."""
    epoch: int = 0                   # epochs completed
    global_step: int = 0             # optimizer steps completed
    best: float = -math.inf          # best validation score so far (the task's `select` metric)
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one record per epoch: curves.png and compare
    loop_s: float = 0.0              # seconds spent in training steps, for ms/step
    loop_steps: int = 0
    wall_s: float = 0.0              # wall time of this run's earlier sittings


class NullWriter:
    """Stands in for SummaryWriter on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@dataclass(repr=False)  # its repr would print the model and the data
class Training:
    """One run's objects: the data, what the loop steps, evaluates and saves, and where it writes."""
    cfg: Config
    out_dir: Path
    proc: Process
    task: Task                           # the loss, predictions and metrics of this kind of model
    sources: Sources
    model: nn.Module                     # the trained weights
    train_model: nn.Module               # what the steps call: the model, maybe in DDP
    ema: torch.optim.swa_utils.AveragedModel | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    writer: object                       # SummaryWriter on rank 0, NullWriter elsewhere
    scene_spec: dict | None
    reader: SmallCNN | None              # the reader the model started from (model.init_from): the tile oracle
    t_start: float
    resume_hint: str = ""                # how to continue after a stop: resume=RUN_DIR, or the same command again

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and saved as "model": the EMA of the weights where there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def steps_per_epoch(self) -> int:
        return num_batches(len(self.sources.train), self.cfg.trainer.batch_size, drop_last=True)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def fit(cfg: Config, out_dir: str | Path, saved: dict | None = None, distributed: bool = True,
        resume_hint: str = "") -> dict | None:
    """Train, select on validation, test once; write checkpoints, TensorBoard events, metrics.json, curves.png,
    figures/. `saved`: a last.pt to continue from; `resume_hint`: what a stopped run says to continue it (default
    resume=OUT_DIR). Returns the test metrics (None on a rank other than 0)."""
    run = setup(cfg, Path(out_dir), saved, distributed)
    run.resume_hint = resume_hint or f"resume={out_dir}"
    started = (time.time(), run.state.epoch)
    with StopSignals() as stop:
        while run.state.epoch < cfg.trainer.epochs:
            record = train_epoch(run, stop)
            if run.proc.rank == 0:
                validate(run, record, started)
            end_epoch(run, record, stop)
    if run.proc.world > 1:
        # The test is rank 0's work alone: leave the group first, so nothing after this waits on a rank that has gone.
        dist.destroy_process_group()
    if run.proc.rank != 0:
        return None
    try:
        with StopSignals(at_once=True):
            return test(run)
    except Stopped as exc:
        log.warning("Stopped by %s during the final test evaluation; the training is complete in %s; finish the "
                    "evaluation with %s", signal.Signals(exc.signum).name, run.ckpt_dir, run.resume_hint)
        raise SystemExit(128 + exc.signum) from None
    finally:
        run.writer.close()


def setup(cfg: Config, out_dir: Path, saved: dict | None = None, distributed: bool = True) -> Training:
    """Process, data, task, model, optimizer, EMA and writer of a run, restored from `saved` if given."""
    t_start = time.time()
    proc = start_process(cfg.trainer, cfg.seed, distributed)
    keep_freed_memory()
    splits, fmt = sources.load(cfg.data)
    check_kind(cfg, fmt)
    if saved is not None and saved.get("items") != fmt.to_dict():
        raise UserError(f"The data of {out_dir} have changed since the run started (its classes, size or pixels); "
                        f"continue it on the same data, or start a new run.")
    task = make_task(cfg, fmt, splits["train"].labels)
    scene_spec = saved.get("scene") if saved is not None else task.scene_spec(cfg)
    src = task.sources(cfg, splits, scene_spec, device=proc.device)
    build.check_sizes(cfg, len(src.train), proc.world)
    if proc.rank == 0:
        write_splits(splits, out_dir)
        if scene_spec is not None:
            log.info("scene %s, label statistics of 100,000 training composites:\n%s", cfg.data.scene,
                     format_statistics(src.train.statistics(100_000), fmt.classes))
    model, reader = start_model(cfg, fmt, proc, saved)
    if cfg.optim.reader_lr == 0 and cfg.model.get("init_from"):  # a trained reader; a random one always learns
        model.freeze_reader()
        if model.encoder == "cells" and cacheable(cfg.data):  # composites of items: every source but test, which
            # the final model reads from its pixels (a whole picture is read from its pixels every time)
            src = with_cell_features(src, model.reader, task, proc, sources.flips(cfg.data, fmt) if cfg.data.augment
                                     else 0.0)
    optimizer, scheduler = build.optimizer(cfg, model, num_batches(len(src.train), cfg.trainer.batch_size, True))
    # With trainer.ema the weights that are evaluated and saved as "model" are an exponential moving average
    # of the trained ones, which are kept as "train_model" for resuming.
    ema = (torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update(cfg.trainer.ema), use_buffers=True)
           if cfg.trainer.ema else None)
    state = restore(saved, ema, optimizer, scheduler, proc) if saved is not None else TrainState()
    if saved is not None:
        log.info("Resuming %s at epoch %d, step %d", out_dir, state.epoch + 1, state.global_step)
    elif proc.rank:
        # After the shared initialisation (same weights everywhere): every other rank its own dropout masks and
        # label-order draws, or N ranks would add the same noise N times.
        seed_everything(proc.seed)
    train_model = model if proc.world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    writer = NullWriter()
    if proc.rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides the points a killed run logged after its last checkpoint (steps after global_step),
        # which this run logs again: no duplicates on resume.
        writer = SummaryWriter(str(out_dir), purge_step=state.global_step + 1 if saved is not None else None)
    log.info("task=%s params=%d train=%d val=%d test=%d device=%s%s", cfg.task, count_params(model), len(src.train),
             len(src.val), len(src.test), proc.device, f" ranks={proc.world}" if proc.world > 1 else "")
    return Training(cfg, out_dir, proc, task, src, model, train_model, ema, optimizer, scheduler, state, writer,
                    scene_spec, reader, t_start)


def check_kind(cfg: Config, fmt) -> None:
    """Multi-label pictures train only the composite tasks, with the picture encoder."""
    if fmt.picture and MODELS[MODEL_OF[cfg.task]].kind == "single":
        raise UserError(f"data.path={cfg.data.path} holds multi-label pictures (a row with several labels, or "
                        f"data.kind=pictures), which task={cfg.task} cannot learn; train task=multilabel or "
                        f"multilabel_bce.")
    if fmt.picture and cfg.model.get("encoder") == "cells":
        raise UserError("model.encoder=cells reads a grid of items, and these pictures have none; drop it.")


def start_model(cfg: Config, fmt, proc: Process, saved: dict | None) -> tuple[nn.Module, SmallCNN | None]:
    """The run's model on its device, from `saved`, else started from the reader at model.init_from (read once:
    it is also the tile oracle where it names the same classes, returned beside the model; None without one)."""
    model = build.model(cfg, fmt)
    path, reader = cfg.model.get("init_from"), None
    if path and (saved is None or Path(path).is_file()):
        reader = build.reader_model(path, proc.device, "model.init_from", split=cfg)
    elif path:
        log.warning("no tile oracle: its reader %s is gone", path)
    if reader is not None and saved is None:
        build.init_encoder(model, reader, path)
        log.info("reader from %s", path)
    if reader is not None and reader.head[-1].out_features != len(fmt.classes):
        reader = None  # a reader of other classes starts the model but cannot name these items
    # channels_last makes the oneDNN convolutions faster; it leaves the LSTM's 2-D weights as they are.
    model = model.to(proc.device, memory_format=torch.channels_last)
    if saved is not None:  # before a frozen reader's features are computed: they are the saved reader's
        model.load_state_dict(saved.get("train_model", saved["model"]))
    return model, reader


def restore(saved: dict, ema, optimizer, scheduler, proc: Process) -> TrainState:
    """Put a saved run's EMA, optimizer, schedule and RNG states back; its loop state."""
    if ema is not None:
        ema.module.load_state_dict(saved["model"])
        ema.n_averaged.fill_(saved["ema_n"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved, proc.rank)
    return TrainState(**saved["state"])


def cacheable(d) -> bool:
    """Whether a frozen reader's features of the training items can be computed once: flips at most (computed
    both ways), no shifts or degradation, which change an item every time."""
    return not d.degrade and (not d.augment or not d.shift)


def with_cell_features(src: Sources, reader: nn.Module, task: Task, proc: Process, hflip: float) -> Sources:
    """The training and validation sources as a frozen reader's features of their items, computed once."""
    train, val = (cell_features(reader, s.split.images, task, proc) for s in (src.train_eval, src.val))
    log.info("reader frozen: its features of the %d training and %d validation items computed once",
             len(train[0]), len(val[0]))
    return Sources(CellFeatures(src.train, *train, hflip), CellFeatures(src.train_eval, *train, fixed=True),
                   CellFeatures(src.val, *val, fixed=True), src.test)


@torch.no_grad()
def cell_features(reader: nn.Module, images: torch.Tensor, task: Task, proc: Process) -> tuple[torch.Tensor, ...]:
    """The reader's features (N, D) of uint8 items (N, C, S, S), of their mirror images, and (D,) of an empty cell
    (the background tone)."""
    reader.eval()
    blank = images.new_tensor(task.fmt.background).view(1, -1, 1, 1).expand(1, *images.shape[1:])
    out = []
    for flip in (False, True):
        parts = []
        for i in range(0, len(images), 1000):
            x = task.fmt.to_input(images[i:i + 1000]).contiguous(memory_format=torch.channels_last)
            with autocast(proc.device, proc.amp):
                parts.append(reader.embed(x.flip(-1) if flip else x).float())
        out.append(torch.cat(parts))
    with autocast(proc.device, proc.amp):
        out.append(reader.embed(task.fmt.to_input(blank)).float()[0])
    return tuple(out)


def save(run: Training, path: Path, rngs: list[dict], **extra) -> None:
    """Checkpoint the run to `path`: rank 0 writes; rngs = gather_rng(world), which every rank calls at the same
    step."""
    if run.proc.rank != 0:
        return
    weights = {"model": run.eval_model.state_dict()}
    if run.ema is not None:
        weights.update(train_model=run.model.state_dict(), ema_n=int(run.ema.n_averaged))
    state = dataclasses.replace(run.state, wall_s=run.state.wall_s + time.time() - run.t_start)
    checkpoint.save(path, {**weights, "optimizer": run.optimizer.state_dict(),
                           "scheduler": run.scheduler.state_dict(), "rng": rngs[0],
                           **({"rng_ranks": rngs} if run.proc.world > 1 else {}), "config": run.cfg.to_dict(),
                           "items": run.task.fmt.to_dict(), "params": count_params(run.model),
                           "scene": run.scene_spec, "task_state": run.task.state(),
                           "state": dataclasses.asdict(state), **extra})


def stop_here(run: Training, signum: int) -> None:
    log.warning("Stopped by %s at epoch %d, step %d; saved %s; continue with %s", signal.Signals(signum).name,
                run.state.epoch + 1, run.state.global_step, run.ckpt_dir / "last.pt", run.resume_hint)
    run.writer.close()
    raise SystemExit(128 + signum)


def train_epoch(run: Training, stop: StopSignals) -> dict:
    """Train one epoch (or the rest of one, on resume); its training record.

    At each sync (every trainer.log_every steps) the per-step train/loss points are written, a due step
    checkpoint is saved and the stop signals are checked: a signal saves last.pt and exits with 128 + its number.
    A NaN or infinite loss stops the run with a UserError before its update lands.
    """
    cfg, st, epoch, per_epoch = run.cfg, run.state, run.state.epoch, run.steps_per_epoch
    start = st.global_step - epoch * per_epoch
    loader = batches(run.sources.train, cfg.trainer.batch_size, epoch=epoch, start=start, drop_last=True,
                     rank=run.proc.rank, world=run.proc.world)
    bar = progress_bar(run, per_epoch - start, f"epoch {epoch + 1}/{cfg.trainer.epochs}")
    t_loop, steps, stopping = time.perf_counter(), 0, None
    try:
        for window in train_steps(run.train_model, run.task, run.optimizer, run.scheduler, loader,
                                  device=run.proc.device, amp=run.proc.amp, grad_clip=cfg.optim.grad_clip,
                                  first_step=st.global_step, log_every=cfg.trainer.log_every,
                                  sync_every=cfg.trainer.ckpt_every, ema=run.ema):
            first = window.step - len(window.losses) + 1
            for i, loss in enumerate(window.losses):  # one point per step
                run.writer.add_scalar("train/loss", loss, first + i)
            steps, st.global_step = steps + len(window.losses), window.step
            bar.update(len(window.losses))
            bar.set_postfix(loss=f"{sum(window.losses) / len(window.losses):.3f}",
                            **{k: f"{v:.3f}" for k, v in window.stats.items()}, refresh=False)
            if cfg.trainer.ckpt_every and window.step % cfg.trainer.ckpt_every == 0:
                save(run, run.ckpt_dir / "last.pt", gather_rng(run.proc.world))
            stopping = stop.agreed(run.proc.world, run.proc.device)
            if stopping is not None:
                break
    except NonFiniteLoss as exc:
        kept = (f"{run.ckpt_dir / 'last.pt'} still holds the last good state" if (run.ckpt_dir / "last.pt").is_file()
                else "no checkpoint was written yet")
        raise UserError(f"The training loss became {exc.value} at step {exc.step} (epoch {epoch + 1}); "
                        f"stopped, and {kept}; lower optim.lr or set optim.grad_clip.") from None
    finally:
        bar.close()
    loop_s = time.perf_counter() - t_loop
    st.loop_s, st.loop_steps = st.loop_s + loop_s, st.loop_steps + steps
    if stopping is not None:
        save(run, run.ckpt_dir / "last.pt", gather_rng(run.proc.world))
        if run.proc.world > 1:  # torchrun tears the others down as soon as one rank exits: leave once last.pt is whole
            dist.barrier()
        stop_here(run, stopping)
    return {"epoch": epoch + 1, "lr": run.optimizer.param_groups[0]["lr"],
            "perf/ms_per_step": 1000 * loop_s / max(steps, 1),
            "perf/samples_per_s": steps * cfg.trainer.batch_size / max(loop_s, 1e-9)}


def progress_bar(run: Training, total: int, desc: str):
    """A tqdm bar on rank 0 when trainer.progress is on (else a stand-in that does nothing)."""
    if not run.cfg.trainer.progress or run.proc.rank != 0:
        return NullWriter()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)


def evaluate(run: Training, source, desc: str):
    """(metrics, predictions, targets) of the evaluated model on a whole source."""
    return score(run.eval_model, run.task, source, run.proc.device, run.proc.amp,
                 progress=desc if run.cfg.trainer.progress else None)


def validate(run: Training, record: dict, started: tuple[float, int] | None = None) -> dict:
    """Rank 0 after an epoch: add the train and val metrics to `record`, write it to TensorBoard, log one line
    (with the time the remaining epochs will take at this process's pace, given `started`: (time, first epoch))."""
    names = run.task.scalars
    if len(run.sources.train_eval):
        train_m, _, _ = evaluate(run, run.sources.train_eval, "train items")
        # the per-step series owns train/loss; this is the loss of the fixed training items
        record.update({f"train/{k}" if k != "loss" else "train/epoch_loss": train_m[k] for k in names if k in train_m})
    val_m, _, _ = evaluate(run, run.sources.val, "validation")
    record.update({f"val/{k}": val_m[k] for k in names if k in val_m})
    for tag, value in record.items():
        if tag != "epoch":
            run.writer.add_scalar(tag, value, run.state.global_step)
    run.writer.flush()
    shown = ("acc", "epoch_loss", "loss", "f1_samples", "exact_match")
    left, epochs = "", run.cfg.trainer.epochs
    if started and record["epoch"] < epochs:
        per_epoch = (time.time() - started[0]) / (record["epoch"] - started[1])
        left = f", {duration(per_epoch * (epochs - record['epoch']))} left"
    log.info("epoch %d/%d  %s  %.1f ms/step%s", record["epoch"], epochs, "  ".join(
        f"{k}={v:.4f}" for k, v in record.items() if k.split("/")[0] in ("train", "val")
        and k.split("/")[1] in shown), record["perf/ms_per_step"], left)
    return record


def end_epoch(run: Training, record: dict, stop: StopSignals) -> None:
    """Close an epoch on every rank: history, best.pt if validation improved (rank 0 knows), last.pt, and a stop
    signal that arrived meanwhile exits with 128 + its number."""
    st = run.state
    st.history.append({**record, "wall_s": st.wall_s + time.time() - run.t_start})
    st.epoch = record["epoch"]
    value = record.get(f"val/{run.task.select}", -math.inf)  # rank 0 only: the others never write best.pt
    rngs = gather_rng(run.proc.world)  # also keeps the ranks in step while rank 0 evaluates
    if value > st.best:
        st.best, st.best_epoch = value, st.epoch
        save(run, run.ckpt_dir / "best.pt", rngs)
    save(run, run.ckpt_dir / "last.pt", rngs)
    signum = stop.agreed(run.proc.world, run.proc.device)
    if signum is not None:  # every rank passed the agreement after rank 0 wrote last.pt
        log.warning("Stopped by %s after epoch %d; saved %s; continue with %s", signal.Signals(signum).name,
                    st.epoch, run.ckpt_dir / "last.pt", run.resume_hint)
        raise SystemExit(128 + signum)


def test(run: Training) -> dict:
    """Test the best checkpoint once; write figures, hparams, curves.png, best.pt with what test learned (a tuned
    threshold, the summary) and, last, metrics.json: the mark of a finished run."""
    cfg, task, st = run.cfg, run.task, run.state
    best = checkpoint.load(run.ckpt_dir / "best.pt")
    run.eval_model.load_state_dict(best["model"])
    summary = {}
    if task.tunes:
        summary.update(task.tune(*evaluate(run, run.sources.val, "tuning on validation")[1:]))
        log.info("tuned on validation: %s", summary)
    metrics, test_out, test_t = evaluate(run, run.sources.test, "test")
    results = {f"test/{k}": v for k, v in metrics.items()}
    summary.update({"params": count_params(run.model), "train/ms_per_step": 1000 * st.loop_s / max(st.loop_steps, 1),
                    "wall_time_s": st.wall_s + time.time() - run.t_start, f"val/{task.select}_best": st.best,
                    "best_epoch": st.best_epoch, "epochs": st.epoch, "hardware": hardware(run.proc.device)})
    if task.composite and run.reader is not None:
        summary.update(score_oracle(run.reader, run.sources.test, run.proc.device, task.fmt))
        summary["oracle/ckpt"] = cfg.model["init_from"]
    results.update(summary)
    write_predictions(task, test_out, test_t, run.sources.test, run.out_dir / "test_predictions.csv")
    for tag, fig in task.figures(test_out, test_t, run.sources.test, metrics).items():
        run.writer.add_figure(tag, fig, st.global_step, close=False)
        viz.save(fig, run.out_dir / "figures" / f"{tag.replace('/', '_')}.png")
    run.writer.add_hparams(flat_hparams(cfg), {f"test/{k}": results.get(f"test/{k}", math.nan)
                                               for k in ALL_TEST_SCALARS}, run_name=".", global_step=st.global_step)
    title = (f"{cfg.task} ({summary['params']:,} parameters): best val {task.select} {st.best:.4f} at epoch "
             f"{st.best_epoch}, test {results[f'test/{task.select}']:.4f}")
    viz.save(viz.curves(st.history, task.select, title), run.out_dir / "curves.png")
    checkpoint.save(run.ckpt_dir / "best.pt", {**best, "task_state": task.state(), "summary": summary})
    write_atomic(run.out_dir / "metrics.json", strict_json(results, indent=2) + "\n")
    log.info("test: %s", "  ".join(f"{k}={results[f'test/{k}']:.4f}" for k in task.scalars if f"test/{k}" in results))
    if results[f"test/{task.select}"] == 0:
        log.warning("test %s is 0 after %d steps: the model has not learned to name items yet; train longer "
                    "(trainer.epochs, data.limit)", task.select, st.global_step)
    log.info("wrote %s (%.0f s)", run.out_dir / "metrics.json", summary["wall_time_s"])
    return results


def write_splits(splits: dict, out_dir: Path) -> None:
    """splits.csv: the split of every file of a user's data."""
    if splits["train"].files is not None:
        write_atomic(out_dir / "splits.csv", csv_text([["file", "split"], *([f, name] for name, split in
                                                                            splits.items() for f in split.files)]))


def write_predictions(task: Task, out: dict, target: torch.Tensor, source, path: Path) -> None:
    """test_predictions.csv: per test item (its file or number) or composite, the true and predicted names and each
    class's score, so a user sees which of their pictures were wrong."""
    pred = task.labels(out)
    true = target[:, None].tolist() if target.dim() == 1 else [row.nonzero().flatten().tolist() for row in target]
    rows = [[i, " ".join(task.names(t)), " ".join(task.names(p)), *(f"{v:.4f}" for v in scores)]
            for i, t, p, scores in zip(source.ids(), true, pred, out["scores"].tolist())]
    write_atomic(path, csv_text([["item", "true", "predicted", *task.classes], *rows]))


def csv_text(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def score_oracle(reader: nn.Module, source, device: torch.device, fmt) -> dict:
    """oracle/* metrics: a reader on each item's box (a grid's cells) of the same composites."""
    metrics, _, _ = score(reader, TileOracle(fmt), source, device, with_loss=False)
    log.info("tile oracle: f1_samples=%.4f exact_match=%.4f", metrics["f1_samples"], metrics["exact_match"])
    return {f"oracle/{k}": v for k, v in metrics.items()}


def flat_hparams(cfg: Config) -> dict:
    flat = {"task": cfg.task, "seed": cfg.seed, **{f"trainer.{k}": v for k, v in vars(cfg.trainer).items()},
            **{f"optim.{k}": v for k, v in vars(cfg.optim).items()},
            **{f"data.{k}": v for k, v in vars(cfg.data).items() if k != "root"},
            **{f"model.{k}": v for k, v in cfg.model.items()}, "eval.tta": cfg.eval.tta}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


def hardware(device: torch.device) -> str:
    """What the run ran on, for the results tables: the GPU's name, or the CPU's and the threads used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"
