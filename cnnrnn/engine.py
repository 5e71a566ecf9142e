"""The loop: train_one_epoch(), evaluate(), and crash-safe checkpoints. Takes objects, never a config."""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import os
import pickle
import random
import time
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cnnrnn.errors import UserError

CHECKPOINT_FORMAT = "cnnrnn/1"


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite at `step`."""

    def __init__(self, step: int, value: float):
        super().__init__(f"step {step}: loss {value}")
        self.step, self.value = step, value


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; False where it can't.

    A training step frees and reallocates the same multi-megabyte activations. By default glibc unmaps or trims
    them, so the next step page-faults them back in (hundreds to 7,500 faults a step here): 8-29% of a CPU step
    where it was measurable (README, Speed). This is what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or a
    preloaded jemalloc would do, for the whole process; the price is that the process keeps its peak memory
    until it exits.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`: a tensor already on that kind of device (data made there, build.sources(device=))
    as it is, a CPU one through pinned memory without waiting (pin_memory refuses a CUDA tensor)."""
    return {k: v if v.device.type == device.type else v.pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()}


def resolve_amp(setting: bool | None, device: torch.device) -> bool:
    """Whether to autocast to bf16: an explicit setting wins; None (auto) means a CUDA GPU with native bf16.

    Auto leaves the CPU in fp32 because oneDNN's bf16 pays only on some CPUs: the task presets ask for it
    where it was measured to pay. A GPU that only emulates bf16 is refused for an explicit true, in one sentence,
    instead of failing or crawling mid-run.
    """
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if setting is None:
        return native
    if setting and device.type == "cuda" and not native:
        raise UserError(f"trainer.amp=true asks for bf16 autocast, which {torch.cuda.get_device_name(device)} does "
                        f"not support natively; set trainer.amp=false (fp32) or null (auto).")
    return bool(setting)


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def guards_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips an update on the device when its `found_inf` attribute is 1, as GradScaler uses it:
    torch's fused optimizers do (AdamW, Adam, SGD, Adagrad); the foreach and for-loop ones refuse the attribute."""
    return bool(getattr(optimizer, "defaults", {}).get("fused"))


def train_one_epoch(model: nn.Module, task, optimizer: torch.optim.Optimizer, scheduler, batches: Iterable[dict],
                    *, device: torch.device, amp: bool = False, grad_clip: float | None = None, first_step: int = 0,
                    log_every: int = 1, sync_at: Callable[[int], bool] | None = None,
                    after_step: Callable[[int], None] | None = None,
                    on_sync: Callable[[int, list[float], dict, int], bool] | None = None) -> dict:
    """Train over `batches`, queuing step after step without waiting for the device.

    The losses and stats stay on the device and reach Python only at a sync: every `log_every` global steps, at a
    step where sync_at(step) is true (a checkpoint is due) and after the last batch. There
    on_sync(step, losses, stats, samples) gets the per-step losses of the steps since the last sync (the last one
    is `step`), their mean stats and the number of samples they saw; it may return True to stop (an interrupt).
    after_step(step) runs after every update, with no host values (the EMA).

    A NaN or infinite loss never reaches the weights. With a fused optimizer a flag on the device
    (optimizer.found_inf) skips that update, and every later one up to the sync, which raises NonFiniteLoss with the
    first bad step: the weights are those before it. With any other optimizer each loss is checked on the host
    before its update (a sync per step).
    """
    model.train()
    distributed = dist.is_available() and dist.is_initialized()
    guard = guards_on_device(optimizer)
    found_inf = torch.zeros((), device=device) if guard else None  # sticky: 1 from the first bad step on
    step, total, count, stopped = first_step, 0.0, 0, False
    losses, stats_seen, samples = [], {}, 0  # the window since the last sync, on the device
    data_s, batches = 0.0, iter(batches)

    def sync() -> bool:
        nonlocal total, losses, stats_seen, samples
        values = torch.stack(losses).tolist()  # the one wait for the device in a window
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteLoss(step - len(values) + 1 + bad, values[bad])
        for v in values:
            total += v
        means = {k: torch.stack(vs).float().mean().item() for k, vs in stats_seen.items()}
        stop = on_sync is not None and on_sync(step, values, means, samples)
        losses, stats_seen, samples = [], {}, 0
        return bool(stop)

    if guard:
        optimizer.found_inf = found_inf
    try:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)  # the data path: gathers, composites, augmentation
            data_s += time.perf_counter() - t0
            if batch is None:
                break
            batch = to_device(batch, device)
            with autocast(device, amp):
                loss, stats = task.loss(model, batch)
            value = loss.detach()
            if distributed:  # every rank sees the same (global) loss, so every rank skips the same steps
                dist.all_reduce(value)
                value /= dist.get_world_size()
            if guard:
                found_inf.masked_fill_(~torch.isfinite(value), 1.0)
            elif not math.isfinite(host := value.item()):
                raise NonFiniteLoss(step + 1, host)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()  # skipped on the device (step count too) once found_inf is 1
            scheduler.step()
            step += 1
            count += 1
            losses.append(value)
            for k, v in stats.items():
                stats_seen.setdefault(k, []).append(torch.as_tensor(v).detach())
            samples += len(next(iter(batch.values())))
            if after_step is not None:
                after_step(step)
            if (step % log_every == 0 or (sync_at is not None and sync_at(step))) and sync():
                stopped = True
                break
        if losses and sync():
            stopped = True
    finally:
        if guard:
            del optimizer.found_inf
    return {"loss": total / max(count, 1), "steps": count, "step": step, "stopped": stopped, "data_s": data_s}


@torch.no_grad()
def evaluate(model: nn.Module, task, batches: Iterable[dict], *, device: torch.device, amp: bool = False,
             with_loss: bool = True) -> tuple[dict[str, float], dict[str, torch.Tensor], torch.Tensor]:
    """Metrics of a whole split, the concatenated predictions (on CPU) and the targets."""
    model.eval()
    outs, targets, loss_sum, n = [], [], 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            batch = to_device(batch, device)
            with autocast(device, amp):
                if with_loss:
                    loss, _ = task.loss(model, batch)
                    loss_sum += loss.item() * len(batch["image"])
                out = task.predict(model, batch)
            outs.append({k: v.cpu() for k, v in out.items()})
            targets.append(task.target(batch).cpu())
            n += len(batch["image"])
    out = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    target = torch.cat(targets)
    result = task.metrics(out, target)
    if with_loss:
        result["loss"] = loss_sum / max(n, 1)
    return result, out, target


def ema_update(decay: float):
    """In-place EMA update for AveragedModel, with the usual warm-up: the decay grows as (1+n)/(10+n)
    up to `decay`, so the average follows the fast early changes instead of lagging epochs behind."""
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - d)
        else:  # integer buffers (batch norm's step count) are copied
            torch._foreach_copy_(averaged, current)
    return update


def ema_step(ema, model: torch.nn.Module) -> None:
    """ema.update_parameters(model) with the same arithmetic, without waiting for the device: AveragedModel copies
    its step count (a CPU tensor) to the device and ema_update's float(n) reads it back, two host syncs a step on a
    GPU; here the count stays on the host."""
    averaged = [t.detach() for t in (*ema.module.parameters(), *ema.module.buffers())]
    current = [t.detach() for t in (*model.parameters(), *model.buffers())]
    n = int(ema.n_averaged)
    if n == 0:
        torch._foreach_copy_(averaged, current)
    else:
        groups: dict[tuple, tuple[list, list]] = {}  # AveragedModel's groups: one per device and dtype
        for a, c in zip(averaged, current, strict=True):
            group = groups.setdefault((a.device, a.dtype), ([], []))
            group[0].append(a)
            group[1].append(c)
        for a, c in groups.values():
            ema.multi_avg_fn(a, c, n)
    ema.n_averaged += 1


# --- checkpoints --------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain data (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_stale_temps(path: Path) -> None:
    """Remove temporary files of earlier writes of `path` by processes that no longer exist (killed mid-write)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            os.kill(int(tmp.name[len(path.name) + 2:-4]), 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write atomically: a temporary file in the same folder, flushed and fsynced, then os.replace.
    A kill at any instant leaves the previous file or the new one, never a torn one; a full disk or another
    OSError is one sentence that says the previous file is intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        try:
            data = io.BytesIO()  # serialised first: torch's writer turns ENOSPC into an opaque RuntimeError
            torch.save({"format": CHECKPOINT_FORMAT, **state}, data)
            with open(tmp, "wb") as f:
                f.write(data.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        before = f"the previous {path.name} is intact" if path.is_file() else f"no {path.name} was written"
        then = "resume" if (path.parent / "last.pt").is_file() else "start again"
        raise UserError(f"Cannot write the checkpoint {path} ({reason}); {before}; free space or fix the folder, "
                        f"then {then}.") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with weights_only=True, so a file from elsewhere cannot run code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt" if (path / "checkpoints").is_dir() else path / "best.pt"
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; give the path of a .pt file written by a run "
                        f"(RUN_DIR/checkpoints/best.pt).")
    if path.stat().st_size == 0:
        raise UserError(f"Checkpoint {path} is empty (0 bytes); use another checkpoint, e.g. the run's last.pt.")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its directory sits at the very end
        raise UserError(f"{path} is not a readable checkpoint (truncated, or another kind of file); use a complete "
                        f"checkpoint written by cnnrnn.")
    try:
        with open(path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise UserError(f"Checkpoint {path} holds Python objects that could run code, and is refused "
                            f"(cnnrnn loads with weights_only=True); use a checkpoint written by cnnrnn.") from None
        raise UserError(f"{path} is not a readable checkpoint ({exc}); use a checkpoint written by cnnrnn.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated or another kind of file: {reason}); "
                        f"use a complete checkpoint written by cnnrnn.") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a cnnrnn checkpoint; use RUN_DIR/checkpoints/best.pt "
                        f"of a cnnrnn run.")
    return state
