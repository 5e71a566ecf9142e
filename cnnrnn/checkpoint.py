"""Checkpoints: a dict of the weights, optimizer, scheduler, RNG states, the config and the loop's state, written
atomically and read with weights_only=True, so a file from elsewhere can neither be torn nor run code."""
from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from cnnrnn.errors import UserError
from cnnrnn.files import write_atomic

FORMAT = "cnnrnn/3"


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


def save(path: str | Path, state: dict) -> None:
    """Write a checkpoint atomically (files.write_atomic); serialised first, because torch's own writer turns a
    full disk into an opaque RuntimeError."""
    path = Path(path)
    data = io.BytesIO()
    torch.save({**state, "format": FORMAT}, data)
    then = "resume" if (path.parent / "last.pt").is_file() else "start again"
    write_atomic(path, data.getvalue(), what="the checkpoint", then=f"free space or fix the folder, then {then}")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint (a run dir means its best.pt); one sentence naming the file if it cannot be one. torch.load
    checks no checksum, so the zip's CRCs are checked first: a flipped byte inside a tensor is caught there."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "best.pt" if (path / "checkpoints").is_dir() else path / "best.pt"
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; give the path of a .pt file written by a run "
                        f"(RUN_DIR/checkpoints/best.pt).")
    try:
        if path.stat().st_size == 0:
            raise UserError(f"Checkpoint {path} is empty (0 bytes); use another checkpoint of that run.")
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
        if broken:
            raise UserError(f"{path} is damaged ({broken} fails its checksum); use another checkpoint of that run.")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise UserError(f"Checkpoint {path} cannot be read (permission denied); give a file you can read.") from None
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # what the weights-only unpickler says of an object
            raise UserError(f"Checkpoint {path} holds Python objects beyond tensors and plain data, which could run "
                            f"code, and is refused (cnnrnn loads with weights_only=True); use a checkpoint written "
                            f"by cnnrnn.") from None
        raise UserError(f"{path} is damaged (its contents cannot be unpickled); use another checkpoint of that "
                        f"run.") from None
    except (OSError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, empty or another kind of file: {reason}); "
                        f"use a complete checkpoint written by cnnrnn.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a cnnrnn checkpoint of this version; use "
                        f"RUN_DIR/checkpoints/best.pt of a cnnrnn run.")
    return state


def entry(state: dict, key: str, kind: type | tuple, path, default=...):
    """state[key], checked to be of `kind`; one sentence naming the file and the field if it is missing or not."""
    if key not in state:
        if default is not ...:
            return default
        raise UserError(f"{path} has no '{key}' field; it is not a complete cnnrnn checkpoint.")
    value = state[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise UserError(f"{path} holds a '{key}' of type {type(value).__name__}, which a cnnrnn checkpoint never "
                        f"has; the file was altered or made elsewhere.")
    return value
