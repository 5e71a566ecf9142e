"""The processes of a run: its device, its rank among torchrun's processes, seeds per rank, and stop signals
that every rank agrees on. Takes plain values, never a config."""
from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from cnnrnn.checkpoint import rng_state, set_rng_state
from cnnrnn.engine import resolve_amp
from cnnrnn.errors import UserError


@dataclass(frozen=True)
class Process:
    """Where this process trains and who it is among torchrun's processes."""
    device: torch.device
    rank: int
    world: int
    amp: bool     # bf16 autocast
    seed: int     # this rank's seed for dropout masks and label-order draws (rank_seed)


def start_process(trainer, seed: int, distributed: bool = True) -> Process:
    """Pick the device, join torchrun's group, set the threads, seed every generator: a run's first step.
    `trainer`: the config's trainer group; distributed=False ignores torchrun's environment (one process)."""
    device = pick_device(trainer.device)
    rank, world = init_distributed(device, distributed)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    amp = resolve_amp(trainer.amp, device)  # an explicit trainer.amp=false wins on CUDA too
    seed_everything(seed)
    return Process(device, rank, world, amp, rank_seed(seed, rank))


class Stopped(Exception):
    """SIGINT or SIGTERM arrived where there is no loop to check a flag (the final evaluation)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step, or with `at_once` into Stopped raised
    where the code is; a second signal kills at once."""

    def __init__(self, at_once: bool = False):
        self.signum, self.at_once = None, at_once

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)
        if self.at_once:
            raise Stopped(signum)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, world: int, device: torch.device) -> int | None:
        """The signal any rank has got, the same answer on every rank, so all stop at the same step instead of
        one waiting forever in the next all_reduce. One process: just the flag, no collective."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def pick_device(name: str, flag: str = "trainer.device=") -> torch.device:
    """cpu, cuda, or auto (cuda where there is one); a sentence for cuda without a GPU. `flag`: how the user
    named it (trainer.device= or an entry point's --device )."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag}cuda, but no CUDA device is available here; use {flag}cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device, enabled: bool = True) -> tuple[int, int]:
    """(rank, world size): torchrun's environment, gloo on CPU, nccl on CUDA; (0, 1) without torchrun or
    when not `enabled` (a model trained by one process, such as the tile oracle's)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if enabled else 1
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of one rank's dropout masks and label-order draws: rank 0 keeps the run seed (a one-process run
    is unchanged), the others get streams of their own derived from (seed, rank) and, on a resume that has no
    saved state for them, the step."""
    if rank == 0 and step == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(1)[0])


def gather_rng(world: int) -> list[dict]:
    """Every rank's RNG states (rank order), so a resumed data-parallel run draws as the uninterrupted one."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(saved: dict, rank: int) -> None:
    states = saved.get("rng_ranks") or [saved["rng"]]
    if rank < len(states):
        set_rng_state(states[rank])
    else:  # resumed on more ranks than saved: a fresh stream, still distinct per rank and step
        seed_everything(rank_seed(saved["config"]["seed"], rank, saved["state"]["global_step"]))


def process_rank() -> int:
    """This process's rank under torchrun (0 without it), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def processes_sharing_cores(n_jobs: int | None = None) -> int:
    """How many processes a launcher started side by side on this machine: torchrun's local world size, or a
    sweep's parallel jobs (the joblib launcher's n_jobs; -1: one per core); else 1."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if not n_jobs:
        return 1
    return cores() if n_jobs < 0 else int(n_jobs)


def share_of_cores(threads: int | None, n_jobs: int | None = None) -> int | None:
    """The intra-op threads to set for a process beside others: its share of the cores, as each taking every core
    slows all of them several times; None alone (torch's default) or when trainer.threads wins (start_process)."""
    share = processes_sharing_cores(n_jobs)
    return None if threads or share == 1 else max(1, cores() // share)
