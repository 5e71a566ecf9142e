"""Every file the project writes goes through `write_atomic`: a temporary file, fsynced, renamed over the old one,
so a kill or a full disk leaves the previous file or the new one, never a torn one, and a failure says which.
What it reads back (a run's .hydra/config.yaml) is checked as it is read."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from cnnrnn.errors import UserError


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


def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], None], what: str = "",
                 then: str = "") -> Path:
    """Write bytes or text to `path`, or let `data(tmp)` write the temporary file (matplotlib's savefig); `what`
    names the file in a failure's sentence (e.g. "the checkpoint"), `then` says how to go on after it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        try:
            if callable(data):
                data(tmp)
            else:
                with open(tmp, "wb") as f:
                    f.write(data.encode() if isinstance(data, str) else data)
            with open(tmp, "rb+") as f:
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
        then = then or "free some space or choose a folder you can write to, then run it again"
        raise UserError(f"Cannot write {what + ' ' if what else ''}{path} ({reason}); {before}; {then}.") from None
    return path


def strict_json(values: dict, indent: int | None = None) -> str:
    """One JSON object; a NaN or infinite value (a diverged model's metric) becomes null, as JSON has no NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}
    return json.dumps(clean, allow_nan=False, indent=indent)


def check_writable(name: str, what: str, example: str, make_folder: bool = False) -> Path:
    """`name` as a file an entry point writes at the end (what: how the user gave it, e.g. "--json x"); a
    sentence now, before any work, if it is a folder, or its folder is missing (unless make_folder: then the
    first folder that exists above it) or not writable."""
    path = Path(name)
    if path.is_dir():
        raise UserError(f"{what} is a folder; give a file path, e.g. {path / example}.")
    folder = path.parent
    while make_folder and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what}: {folder} is a file, not a folder; choose another path.")
    if not folder.is_dir():
        raise UserError(f"{what}: the folder {folder} does not exist; create it first or choose another path.")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{what} cannot be written here (permission denied); choose a path you can write to.")
    return path


def read_yaml(path: Path) -> dict:
    """A YAML file that holds a mapping (a run's .hydra/config.yaml); one sentence if it does not."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not readable YAML ({str(exc).splitlines()[0]}); restore it or remove it.") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a mapping of settings; restore it or remove it.")
    return values
