"""Train a model: python -m cnnrnn.train task=lstm|lstm2|cnn|multilabel|multilabel_bce [key=value ...].

A thin Hydra entry point: the command line is checked first (one clear sentence for a bad key, value or
run dir), then `run(cfg, out_dir)` does the work, so tests call `run` directly.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cnnrnn import build, cli, report, viz
from cnnrnn.config import Config, from_dict
from cnnrnn.data import fashion_mnist, scene
from cnnrnn.data.loader import batches, num_batches
from cnnrnn.engine import (NonFiniteLoss, ema_step, ema_update, keep_freed_memory, load_checkpoint, resolve_amp,
                           save_checkpoint, train_one_epoch)
from cnnrnn.errors import UserError
from cnnrnn.models import count_params
from cnnrnn.ranks import (Stopped, StopSignals, gather_rng, init_distributed, pick_device, rank_seed, restore_rng,
                           seed_everything)

log = logging.getLogger("cnnrnn")


class NullWriter:
    """Stands in for SummaryWriter on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def leave_rank() -> None:
    """End a rank other than 0 once the group is gone, skipping the interpreter's teardown: there gloo's threads
    abort the process now and then (std::terminate, SIGABRT; 9 of 90 two-rank runs of a 20-line script), and
    torchrun answers a failed rank by killing rank 0 in the middle of its test evaluation."""
    cli.remove_rank_scratch()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _flat_hparams(cfg: Config) -> dict:
    flat = {"task": cfg.task, "seed": cfg.seed, **{f"trainer.{k}": v for k, v in vars(cfg.trainer).items()},
            **{f"optim.{k}": v for k, v in vars(cfg.optim).items()},
            **{f"data.{k}": v for k, v in vars(cfg.data).items() if k not in ("root",)},
            **{f"model.{k}": v for k, v in cfg.model.items()}, "eval.tta": cfg.eval.tta}
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()}


@dataclass(repr=False)  # its repr would print the model and the data
class Run:
    """One training run's objects, made by setup(); train_epoch(), evaluate_epoch(), end_epoch(), save() and
    finish() take it."""
    cfg: Config
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    amp: bool
    src: Any                       # build.sources(): train, train_eval, val, test
    task: Any                      # tasks.py: loss, predict, metrics
    model: torch.nn.Module         # the trained weights
    train_model: torch.nn.Module   # what the steps call: model, maybe wrapped in DDP and compiled
    eval_model: torch.nn.Module    # what is evaluated and saved as "model": model, or its EMA
    ema: Any                       # AveragedModel or None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    writer: Any                    # SummaryWriter on rank 0, NullWriter elsewhere
    st: dict                       # the loop's state, saved in every checkpoint
    params: int
    steps_per_epoch: int
    scene_spec: Any
    t_start: float

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def run(cfg: Config, out_dir: str | Path, distributed: bool = True) -> dict:
    """Train, select on validation, test once; write checkpoints, TensorBoard events, metrics.json, curves.png.
    distributed=False ignores torchrun's environment (one process)."""
    cfg, out_dir, saved = resume_point(cfg, out_dir)
    if saved is not None and saved.get("finished"):
        log.info("Run %s is finished; nothing to do.", out_dir)
        return json.loads((out_dir / "metrics.json").read_text())
    r = setup(cfg, out_dir, saved, distributed)
    with StopSignals() as stop:
        while r.st["epoch"] < cfg.trainer.epochs and not r.st["finished"]:
            record = train_epoch(r, stop)
            if r.rank == 0:
                evaluate_epoch(r, record)
            end_epoch(r, record, stop)

    if r.world > 1:
        # The test and the tile oracle (a run of its own, maybe minutes of training) are rank 0's work alone:
        # leave the group first, so nothing after this point can wait on a rank that has gone.
        dist.destroy_process_group()
    if r.rank != 0:
        leave_rank()
    try:
        with StopSignals(at_once=True):
            metrics = finish(r)
    except Stopped as exc:
        r.writer.close()
        log.warning("Stopped by %s during the final test evaluation; the training is complete in %s; finish the "
                    "evaluation with resume=%s", signal.Signals(exc.signum).name, r.ckpt_dir, out_dir)
        raise SystemExit(128 + exc.signum) from None
    r.writer.close()
    return metrics


def resume_point(cfg: Config, out_dir: str | Path) -> tuple[Config, Path, dict | None]:
    """(config, run dir, checkpoint to continue from): a resumed run continues exactly as it was configured, in its
    own dir (only a new oracle.ckpt is taken); a new run has no checkpoint."""
    if not cfg.resume:
        return cfg, Path(out_dir), None
    out_dir = Path(cfg.resume)
    saved = load_checkpoint(out_dir / "checkpoints" / "last.pt")
    oracle = {**saved["config"]["oracle"], **({"ckpt": cfg.oracle.ckpt} if cfg.oracle.ckpt else {})}
    return from_dict({**saved["config"], "resume": cfg.resume, "oracle": oracle}), out_dir, saved


def setup(cfg: Config, out_dir: Path, saved: dict | None = None, distributed: bool = True) -> Run:
    """Device, process group, data, task, model, optimizer, EMA and writer of a run, restored from `saved` if given."""
    t_start = time.time()
    device = pick_device(cfg.trainer.device)
    rank, world = init_distributed(device, distributed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    keep_freed_memory()
    amp = resolve_amp(cfg.trainer.amp, device)  # an explicit trainer.amp=false wins on CUDA too
    seed_everything(cfg.seed)

    data = fashion_mnist.splits(cfg.data.root, cfg.data.val_size, cfg.data.limit, cfg.data.seed)
    build.check_sizes(cfg, len(data["train"]), world)
    task = build.task(cfg, data["train"].labels)
    scene_spec = saved.get("scene") if saved is not None else build.scene_spec(cfg)
    src = build.sources(cfg, data, scene_spec, device=device)
    if cfg.kind == "bce" and cfg.data.repeats and rank == 0:
        log.warning("data.repeats=%s: the BCE baseline names sets, so it reports set metrics only (no multiset "
                    "metrics); the decoder with model.target=multiset counts", cfg.data.repeats)
    if cfg.kind != "single" and rank == 0:
        log.info("scene %s, label statistics of 100,000 training composites:\n%s", cfg.data.scene,
                 scene.format_statistics(src.train.statistics(100_000)))
    # channels_last makes the oneDNN convolutions faster; it leaves the LSTM's 2-D weights as they are.
    model = build.model(cfg)
    if cfg.model.get("init_from") and saved is None:
        copied = build.init_encoder(model, cfg.model["init_from"])
        log.info("encoder initialised from %s (%d tensors)", cfg.model["init_from"], len(copied))
    model = model.to(device, memory_format=torch.channels_last)
    params = count_params(model)
    steps_per_epoch = num_batches(len(src.train), cfg.trainer.batch_size, drop_last=True)
    optimizer, scheduler = build.optimizer(cfg, model, steps_per_epoch)
    log.info("task=%s model=%s params=%d train=%d val=%d test=%d device=%s%s", cfg.task, cfg.model["name"], params,
             len(src.train), len(src.val), len(src.test), device, f" ranks={world}" if world > 1 else "")

    st = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": -math.inf, "best_epoch": 0, "history": [],
          "loop_s": 0.0, "loop_steps": 0, "wall_s": 0.0, "finished": False}
    # With trainer.ema the weights that are evaluated and saved as "model" are an exponential moving average
    # of the trained ones, which are kept as "train_model" for resuming.
    ema = None
    if cfg.trainer.ema:
        from torch.optim.swa_utils import AveragedModel
        ema = AveragedModel(model, multi_avg_fn=ema_update(cfg.trainer.ema), use_buffers=True)
    eval_model = ema.module if ema is not None else model
    if saved is not None:
        model.load_state_dict(saved.get("train_model", saved["model"]))
        if ema is not None:
            ema.module.load_state_dict(saved["model"])
            ema.n_averaged.fill_(saved["ema_n"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved, rank)
        st.update({k: saved[k] for k in st})
        log.info("Resuming %s at epoch %d, step %d", out_dir, st["epoch"] + 1, st["global_step"])
    elif rank:
        # After the shared initialisation (same weights everywhere): every other rank its own dropout masks and
        # label-order draws, or N ranks would add the same noise N times.
        seed_everything(rank_seed(cfg.seed, rank))

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.trainer.compile:
        train_model = torch.compile(train_model)

    writer = NullWriter()
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        # purge_step hides the points a killed run logged after its last checkpoint (steps after
        # global_step), which this run logs again: no duplicates on resume.
        writer = SummaryWriter(str(out_dir), purge_step=st["global_step"] + 1 if cfg.resume else None)
    return Run(cfg=cfg, out_dir=out_dir, device=device, rank=rank, world=world, amp=amp, src=src, task=task,
               model=model, train_model=train_model, eval_model=eval_model, ema=ema, optimizer=optimizer,
               scheduler=scheduler, writer=writer, st=st, params=params, steps_per_epoch=steps_per_epoch,
               scene_spec=scene_spec, t_start=t_start)


def save(r: Run, path: Path, rngs: list[dict], **extra) -> None:
    """Checkpoint the run to `path`: rank 0 writes; rngs = gather_rng(world), which every rank calls at the same
    step."""
    if r.rank != 0:
        return
    weights = {"model": r.eval_model.state_dict()}
    if r.ema is not None:
        weights.update(train_model=r.model.state_dict(), ema_n=int(r.ema.n_averaged))
    save_checkpoint(path, {**weights, "optimizer": r.optimizer.state_dict(), "scheduler": r.scheduler.state_dict(),
                           "rng": rngs[0], "config": r.cfg.to_dict(), **({"rng_ranks": rngs} if r.world > 1 else {}),
                           "classes": list(fashion_mnist.CLASSES), "params": r.params, "scene": r.scene_spec,
                           "task_state": r.task.state(), **{**r.st, "wall_s": r.st["wall_s"] + time.time() - r.t_start},
                           **extra})


def train_epoch(r: Run, stop: StopSignals) -> dict:
    """Train one epoch (or the rest of one, on resume) with its per-step logging; the epoch's training record.

    Losses reach the host every trainer.log_every steps (a sync): then the per-step train/loss points are written,
    the bar moves, a due last.pt is saved (a step of trainer.ckpt_every is always a sync) and the stop signals are
    checked. A signal saves last.pt and exits with 128 + its number; a NaN or infinite loss stops the run with a
    UserError before its update lands.
    """
    cfg, st, epoch = r.cfg, r.st, r.st["epoch"]
    train_batches = batches(r.src.train, cfg.trainer.batch_size, epoch=epoch, start=st["step_in_epoch"],
                            drop_last=True, rank=r.rank, world=r.world)
    bar = None
    if cfg.trainer.progress and r.rank == 0:
        from tqdm import tqdm
        bar = tqdm(train_batches, total=r.steps_per_epoch, initial=st["step_in_epoch"], mininterval=1.0,
                   desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}", leave=False, dynamic_ncols=True)
    t_loop, seen, stopping = time.perf_counter(), 0, None

    def ckpt_due(step: int) -> bool:
        return bool(cfg.trainer.ckpt_every) and step % cfg.trainer.ckpt_every == 0

    def on_sync(step: int, losses: list[float], stats: dict, n: int) -> bool:
        nonlocal seen, stopping
        seen += n * r.world
        for i, loss in enumerate(losses):  # one point per step
            r.writer.add_scalar("train/loss", loss, step - len(losses) + 1 + i)
        if bar is not None:
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}", **{k: f"{v:.3f}" for k, v in stats.items()},
                            samples_s=f"{seen / (time.perf_counter() - t_loop):.0f}", refresh=False)
        if ckpt_due(step):
            st.update(global_step=step, step_in_epoch=step - epoch * r.steps_per_epoch)
            save(r, r.ckpt_dir / "last.pt", gather_rng(r.world))
        stopping = stop.agreed(r.world, r.device)
        return stopping is not None

    after_step = (lambda step: ema_step(r.ema, r.model)) if r.ema is not None else None
    try:
        result = train_one_epoch(r.train_model, r.task, r.optimizer, r.scheduler, bar or train_batches,
                                 device=r.device, amp=r.amp, grad_clip=cfg.optim.grad_clip,
                                 first_step=st["global_step"], log_every=cfg.trainer.log_every, sync_at=ckpt_due,
                                 after_step=after_step, on_sync=on_sync)
    except NonFiniteLoss as exc:
        kept = (f"{r.ckpt_dir / 'last.pt'} still holds the last good state" if (r.ckpt_dir / "last.pt").is_file()
                else "no checkpoint was written yet")
        raise UserError(f"The training loss became {exc.value} at step {exc.step} (epoch {epoch + 1}); "
                        f"stopped, and {kept}; lower optim.lr or set optim.grad_clip.") from None
    finally:
        if bar is not None:
            bar.close()
    loop_s = time.perf_counter() - t_loop
    st["loop_s"] += loop_s
    st["loop_steps"] += result["steps"]
    st["global_step"] = result["step"]
    if result["stopped"]:
        st["step_in_epoch"] += result["steps"]
        save(r, r.ckpt_dir / "last.pt", gather_rng(r.world))
        log.warning("Stopped by %s at epoch %d, step %d; saved %s; continue with resume=%s",
                    signal.Signals(stopping).name, epoch + 1, st["global_step"], r.ckpt_dir / "last.pt", r.out_dir)
        r.writer.close()
        if r.world > 1:  # torchrun tears the others down as soon as one rank exits: leave once last.pt is whole
            dist.barrier()
        raise SystemExit(128 + stopping)
    return {"epoch": epoch + 1, "lr": r.optimizer.param_groups[0]["lr"], "train/loss_running": result["loss"],
            "perf/ms_per_step": 1000 * loop_s / max(result["steps"], 1),
            "perf/samples_per_s": result["steps"] * cfg.trainer.batch_size / loop_s,
            "perf/data_share": result["data_s"] / loop_s}


def evaluate_epoch(r: Run, record: dict) -> dict:
    """Rank 0 after an epoch: add the train and val metrics to `record`, write it to TensorBoard, log one line."""
    names = report.scalar_names(r.cfg.kind)
    if len(r.src.train_eval):
        train_m, _, _ = report.score(r.eval_model, r.task, r.src.train_eval, r.device, r.amp)
        # the per-step series owns train/loss; this is the loss of the fixed training items
        record.update({f"train/{k}" if k != "loss" else "train/epoch_loss": train_m[k] for k in names if k in train_m})
    val_m, _, _ = report.score(r.eval_model, r.task, r.src.val, r.device, r.amp)
    record.update({f"val/{k}": val_m[k] for k in names if k in val_m})
    for tag, value in record.items():
        if tag != "epoch" and tag != "train/loss_running":
            r.writer.add_scalar(tag, value, r.st["global_step"])
    r.writer.flush()
    shown = ("acc", "epoch_loss", "loss", "f1_samples", "exact_match")
    log.info("epoch %d/%d  %s  %.1f ms/step", record["epoch"], r.cfg.trainer.epochs, "  ".join(
        f"{k}={v:.4f}" for k, v in record.items() if k.split("/")[0] in ("train", "val")
        and k.split("/")[1] in shown), record["perf/ms_per_step"])
    return record


def end_epoch(r: Run, record: dict, stop: StopSignals) -> None:
    """Close an epoch on every rank: history, best.pt if validation improved (rank 0 knows), last.pt, and a stop
    signal that arrived meanwhile exits with 128 + its number."""
    st, epoch = r.st, record["epoch"]
    st["history"].append(record)
    st["epoch"], st["step_in_epoch"] = epoch, 0
    score = record.get(f"val/{r.task.select}", -math.inf)  # rank 0 only: the others never write best.pt
    rngs = gather_rng(r.world)  # also keeps the ranks in step while rank 0 evaluates
    if score > st["best"]:
        st["best"], st["best_epoch"] = score, epoch
        save(r, r.ckpt_dir / "best.pt", rngs)
    save(r, r.ckpt_dir / "last.pt", rngs)
    stopping = stop.agreed(r.world, r.device)
    if stopping is not None:
        log.warning("Stopped by %s after epoch %d; saved %s; continue with resume=%s",
                    signal.Signals(stopping).name, epoch, r.ckpt_dir / "last.pt", r.out_dir)
        raise SystemExit(128 + stopping)  # every rank passed the agreement after rank 0 wrote last.pt


def finish(r: Run) -> dict:
    """Test the best checkpoint once; write metrics.json, curves.png, figures, hparams; mark the run finished."""
    cfg, task, st, writer, model = r.cfg, r.task, r.st, r.writer, r.eval_model
    best = load_checkpoint(r.ckpt_dir / "best.pt")
    model.load_state_dict(best["model"])
    summary = {}
    if cfg.kind == "bce":
        _, val_out, val_t = report.score(model, task, r.src.val, r.device, r.amp)
        summary["threshold"] = task.tune(val_out, val_t)
        log.info("threshold tuned on validation (micro F1): %.2f", task.threshold)
    results, test_out, test_t = report.score_test(model, task, r.src.test, r.device, r.amp)
    summary.update({"params": r.params, "train/ms_per_step": 1000 * st["loop_s"] / max(st["loop_steps"], 1),
                    "wall_time_s": st["wall_s"] + time.time() - r.t_start, f"val/{task.select}_best": st["best"],
                    "best_epoch": st["best_epoch"], "epochs": st["epoch"], "hardware": hardware(r.device)})
    if cfg.kind != "single":
        summary.update(tile_oracle(cfg, r.out_dir, r.src.test, r.device))
    results.update(summary)
    names = report.scalar_names(cfg.kind)
    report.write_figures(writer, cfg.kind, task, r.src.test, test_out, test_t, st["global_step"],
                         r.out_dir / "figures")
    writer.add_hparams(_flat_hparams(cfg), {f"test/{k}": results[f"test/{k}"] for k in names if f"test/{k}" in results},
                       run_name=".", global_step=st["global_step"])
    (r.out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    title = (f"{cfg.task} ({r.params:,} parameters): best val {task.select} {st['best']:.4f} at epoch "
             f"{st['best_epoch']}, test {results[f'test/{task.select}']:.4f}")
    viz.save(viz.curves(st["history"], names[0], title), r.out_dir / "curves.png")
    save_checkpoint(r.ckpt_dir / "best.pt", {**best, "task_state": task.state(), "summary": summary})
    last = load_checkpoint(r.ckpt_dir / "last.pt")
    save_checkpoint(r.ckpt_dir / "last.pt", {**last, "finished": True, "task_state": task.state(),
                                             "summary": summary})
    log.info("test: %s", "  ".join(f"{k}={results[f'test/{k}']:.4f}" for k in names if f"test/{k}" in results))
    log.info("wrote %s (%.0f s)", r.out_dir / "metrics.json", summary["wall_time_s"])
    return results


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


def tile_oracle(cfg: Config, out_dir: Path, test_src, device) -> dict:
    """The single-label cnn applied to each occupied test cell: oracle/* metrics on the same composites."""
    path = Path(cfg.oracle.ckpt) if cfg.oracle.ckpt else train_oracle(cfg, out_dir)
    m = report.score_oracle(path, cfg.data.test_grid, test_src, device)
    log.info("tile oracle (%s): f1_samples=%.4f exact_match=%.4f", path, m["oracle/f1_samples"],
             m["oracle/exact_match"])
    return m


def train_oracle(cfg: Config, out_dir: Path) -> Path:
    """Train (or continue, or reuse) the tile oracle's cnn on the run's items; the path of its best.pt.

    In RUN/oracle, or with oracle.cache in a folder named by everything that shapes the cnn, so every run on the
    same items (a sweep's jobs) shares one; a lock makes a second process wait for the first to finish it.
    """
    import fcntl

    d, m = cfg.data, cfg.model
    epochs = [] if cfg.oracle.epochs is None else [f"trainer.epochs={cfg.oracle.epochs}"]
    # The oracle's per-item stage is the composite encoder's (same convs, its dense layer the cell conv), so the
    # comparison is of what each model does with the same item reader; the cnn also fits model.init_from.
    shape = [f"model.channels=[{','.join(map(str, m['channels']))}]", f"model.convs={m['convs']}",
             f"model.pool_first={str(m.get('pool_first', False)).lower()}",
             *([f"model.hidden={m['cell_dim']}"] if m.get("cell") else [])]
    overrides = ["task=cnn", *shape, *epochs, f"seed={cfg.seed}", f"data.root={d.root}", f"data.val_size={d.val_size}",
                 f"data.seed={d.seed}", f"data.limit={'null' if d.limit is None else d.limit}",
                 f"data.train_eval_size={d.train_eval_size}", f"data.degrade={d.degrade}"]
    if cfg.oracle.cache:
        name = "-".join(f"{k.rsplit('.', 1)[-1]}{v}".replace("task", "").replace(",", "_").strip("[]")
                        .replace("[", "").replace("]", "") for k, v in (o.split("=", 1) for o in overrides)
                        if not k.startswith(("data.root", "data.train_eval")))
        root = hashlib.md5(str(Path(d.root).resolve()).encode()).hexdigest()[:6]  # another data.root: another cnn
        sub = Path(cfg.oracle.cache) / f"{name}-root{root}"
    else:
        sub = out_dir / "oracle"
    sub.parent.mkdir(parents=True, exist_ok=True)
    oracle_cfg = cli.compose_config([*overrides, f"trainer.device={cfg.trainer.device}",
                                     f"trainer.progress={str(cfg.trainer.progress).lower()}",
                                     *([f"trainer.threads={cfg.trainer.threads}"] if cfg.trainer.threads else [])])
    with open(sub.parent / f".{sub.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run training this very cnn: wait, then reuse it
        if (sub / "checkpoints" / "last.pt").is_file():
            oracle_cfg.resume = str(sub)  # an interrupted oracle continues; a finished one is reused
        else:
            log.info("tile oracle: training the single-label cnn in %s (set oracle.ckpt to reuse one)", sub)
        # One process even under torchrun: the group is gone (run() left it), and a one-process oracle is the very
        # cnn a one-process run trains, so oracle/* numbers compare across both.
        run(oracle_cfg, sub, distributed=False)
    return sub / "checkpoints" / "best.pt"


def main() -> None:
    cli.hydra_entry(run)


if __name__ == "__main__":
    main()
