"""The processes of a run: its device, its rank among torchrun's processes, seeds per rank, and stop signals
that every rank agrees on. Takes plain values, never a config."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import torch
import torch.distributed as dist

from cnnrnn.engine import rng_state, set_rng_state
from cnnrnn.errors import UserError


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


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA device is available; use trainer.device=auto or cpu.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def init_distributed(device: torch.device, enabled: bool = True) -> tuple[int, int]:
    """(rank, world size): torchrun's environment, gloo on CPU, nccl on CUDA; (0, 1) without torchrun or
    when not `enabled` (the tile oracle, trained by rank 0 alone after the group is gone)."""
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
        seed_everything(rank_seed(saved["config"]["seed"], rank, saved["global_step"]))
