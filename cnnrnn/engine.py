"""The loop's pieces: train_steps() over one epoch's batches, score() of a whole split, the EMA step, bf16
autocast. Takes objects, never a config."""
from __future__ import annotations

import ctypes
import ctypes.util
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from cnnrnn.data.loader import batches
from cnnrnn.errors import UserError


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite at `step`."""

    def __init__(self, step: int, value: float):
        super().__init__(f"step {step}: loss {value}")
        self.step, self.value = step, value


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS; False where it can't.

    A training step frees and reallocates the same multi-megabyte activations. By default glibc unmaps or trims
    them, so the next step page-faults them back in, a share of a CPU step worth having back (docs/speed.md).
    This is what MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ or a preloaded jemalloc would do, for the whole
    process; the price is that the process keeps its peak memory until it exits.
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


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 in hardware: a CUDA GPU that does, a CPU with AVX512-BF16 or AMX units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: stay in fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(setting: bool | None, device: torch.device) -> bool:
    """Whether to autocast to bf16: an explicit setting wins; None (auto) means where the device has bf16 units.

    Elsewhere bf16 is emulated and slower than fp32 (docs/speed.md). A GPU that only emulates bf16 is refused for
    an explicit true, in one sentence, instead of failing or crawling mid-run.
    """
    native = native_bf16(device)
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


def one_step(model: nn.Module, task, optimizer, scheduler, batch: dict, device: torch.device, amp: bool,
             grad_clip: float | None, found_inf: torch.Tensor | None, step: int, distributed: bool):
    """One optimizer step; its loss (on the device, averaged over the ranks) and stats. With `found_inf` a bad loss
    flags the device and the update is skipped there; without it, it raises here (a host sync)."""
    with autocast(device, amp):
        loss, stats = task.loss(model, batch)
    value = loss.detach()
    if distributed:  # every rank sees the same (global) loss, so every rank skips the same steps
        dist.all_reduce(value)
        value /= dist.get_world_size()
    if found_inf is not None:
        found_inf.masked_fill_(~torch.isfinite(value), 1.0)
    elif not math.isfinite(host := value.item()):
        raise NonFiniteLoss(step + 1, host)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()  # skipped on the device (step count too) once found_inf is 1
    scheduler.step()
    return value, stats


@dataclass
class Window:
    """The steps since the last sync, read on the host: `step` is the global step of the last of them."""
    step: int
    losses: list[float]
    stats: dict[str, float]


def train_steps(model: nn.Module, task, optimizer: torch.optim.Optimizer, scheduler, loader: Iterable[dict], *,
                device: torch.device, amp: bool = False, grad_clip: float | None = None, first_step: int = 0,
                log_every: int = 1, sync_every: int = 0, ema=None) -> Iterator[Window]:
    """Train over the batches of `loader`, queuing step after step without waiting for the device; yield a Window at
    each sync.

    The losses and stats stay on the device and reach Python only at a sync: every `log_every` global steps, every
    `sync_every` steps (checkpoints are due; 0: never) and after the last batch. The caller logs, checkpoints or
    stops there (a `break` ends the epoch after that window's steps). With `ema` (an AveragedModel) its average is
    updated after every step.

    A NaN or infinite loss never reaches the weights. With a fused optimizer a flag on the device
    (optimizer.found_inf) skips that update, and every later one up to the sync, which raises NonFiniteLoss with the
    first bad step: the weights are those before it. With any other optimizer each loss is checked on the host
    before its update (a sync per step).
    """
    model.train()
    distributed = dist.is_available() and dist.is_initialized()
    guard = guards_on_device(optimizer)
    found_inf = torch.zeros((), device=device) if guard else None  # sticky: 1 from the first bad step on
    step, losses, stats_seen = first_step, [], {}  # the window since the last sync, on the device

    def window() -> Window:
        values = torch.stack(losses).tolist()  # the one wait for the device in a window
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise NonFiniteLoss(step - len(values) + 1 + bad, values[bad])
        means = {k: torch.stack(vs).float().mean().item() for k, vs in stats_seen.items()}
        return Window(step, values, means)

    if guard:
        optimizer.found_inf = found_inf
    try:
        for batch in loader:
            value, stats = one_step(model, task, optimizer, scheduler, to_device(batch, device), device, amp,
                                    grad_clip, found_inf, step, distributed)
            step += 1
            losses.append(value)
            for k, v in stats.items():
                stats_seen.setdefault(k, []).append(torch.as_tensor(v).detach())
            if ema is not None:
                ema_step(ema, model)
            if step % log_every == 0 or sync_every and step % sync_every == 0:
                yield window()
                losses, stats_seen = [], {}
        if losses:
            yield window()
    finally:
        if guard:
            del optimizer.found_inf


EVAL_BATCH = 500  # pictures of up to 4 cells per batch: fixed, so that evaluate reproduces a run's numbers exactly


def eval_batch(source) -> int:
    """Pictures per evaluation batch: EVAL_BATCH, fewer on grids of more than 4 cells (the same cells in all)."""
    return max(1, EVAL_BATCH * 4 // max(4, getattr(source, "grid", 1) ** 2))


@torch.no_grad()
def score(model: nn.Module, task, source, device: torch.device, amp: bool = False, with_loss: bool = True,
          progress: str | None = None) -> tuple[dict[str, float], dict[str, torch.Tensor], torch.Tensor]:
    """Metrics of a whole split, the concatenated predictions (on CPU) and the targets; `progress`: a bar's title."""
    # A fixed seed for what scoring draws (the targets of model.label_order=random), so that evaluate reproduces
    # the run's loss; forked, so the training stream (and exact resume) is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed(0)
        model.eval()
        outs, targets, loss_sum, n = [], [], 0.0, 0
        loader = batches(source, eval_batch(source))
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, desc=progress, total=-(-len(source) // eval_batch(source)), leave=False,
                          dynamic_ncols=True)
        with torch.inference_mode():
            for batch in loader:
                batch = to_device(batch, device)
                with autocast(device, amp):
                    if with_loss:
                        loss, _ = task.loss(model, batch)
                        loss_sum += loss.item() * len(task.target(batch))
                    out = task.predict(model, batch)
                outs.append({k: v.cpu() for k, v in out.items()})
                targets.append(task.target(batch).cpu())
                n += len(targets[-1])
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
