"""Claiming a run directory before any work: a run only ever writes into a folder it created or found empty,
and holds an exclusive lock on it while it lives, so no spelling of a path and no second process can make two
runs share one folder. No Hydra here: the entry points resolve the path, this module only sees real folders."""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass, field
from itertools import takewhile
from pathlib import Path

from cnnrnn.errors import UserError

RUN_MARKS = ("checkpoints", "metrics.json", ".hydra")  # what makes a folder a run (.hydra: Hydra wrote it)
SWEEP_FILE = "multirun.yaml"  # Hydra's own file in a sweep folder


@dataclass
class Claim:
    """A locked folder; `created`: the folders this process made for it, outermost first (removed on abandon)."""
    path: Path
    fd: int
    created: list[Path] = field(default_factory=list)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def remove_all(self) -> None:
        """After a refusal or an interrupt that came late: remove what this run wrote, and the folders it made."""
        for entry in self.path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.remove_if_unused()

    def remove_if_unused(self) -> None:
        """After a refusal: remove the folder and its new parents if nothing but Hydra's sweep file is left."""
        self.release()
        try:
            left = [p for p in self.path.iterdir() if p.name != SWEEP_FILE]
        except OSError:
            return
        if left:
            return
        (self.path / SWEEP_FILE).unlink(missing_ok=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else's now) or gone
                return


def _lock(path: Path, patience_s: float = 1.0) -> int | None:
    """An fd holding an exclusive flock on the folder, or None if another process holds it for `patience_s`:
    a command that only looks at the folder and refuses holds it for milliseconds, a live run for its life."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)


def _mkdirs(path: Path) -> list[Path]:
    """Create path and its missing parents; the ones created, outermost first. mkdir of the last one is the
    atomic step: of two processes creating the same folder, one gets FileExistsError."""
    missing = takewhile(lambda folder: not folder.exists() and not folder.is_symlink(), [path, *path.parents])
    created = []
    for folder in reversed(list(missing)):
        with suppress(FileExistsError):
            folder.mkdir()
            created.append(folder)
    return created


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in RUN_MARKS)


def claim(path: str | Path, key: str = "hydra.run.dir") -> Claim:
    """Lock `path` for a new run: created here, or an existing empty folder; else one sentence why not.
    `key` names the setting in the sentences (hydra.run.dir or hydra.sweep.dir)."""
    path = Path(os.path.abspath(path))
    for _ in range(3):  # retried only if the folder was removed between locking and looking
        if path.exists() and not path.is_dir():
            raise UserError(f"{key}={path} is a file, not a folder; choose a folder for the run.")
        try:
            created = _mkdirs(path)
            fd = _lock(path)
        except OSError as exc:
            raise UserError(f"Cannot create the run folder {path} ({exc.strerror}); choose a writable place with "
                            f"{key}=DIR.") from None
        if fd is None:
            raise UserError(f"{key}={path} is being written by another run that is still going; choose a new folder, "
                            f"or wait for that run to end.")
        if os.fstat(fd).st_ino != os.stat(path).st_ino:  # a refused run removed it meanwhile: claim it afresh
            os.close(fd)
            continue
        found = Claim(path, fd, created)
        entries = sorted(p.name for p in path.iterdir())
        if not entries:
            writable(found, key)
            return found
        found.release()
        if holds_run(path) and key == "hydra.run.dir":
            stopped = "" if (path / "checkpoints" / "last.pt").is_file() else (
                " (it stopped before its first checkpoint: delete the folder to start again)")
            raise UserError(f"{key}={path} already holds a run{stopped}, which this one would mix with; choose a "
                            f"new folder, or continue that run with resume={path}.")
        if key == "hydra.sweep.dir" and (SWEEP_FILE in entries or any(holds_run(p) for p in path.iterdir())):
            raise UserError(f"{key}={path} already holds a sweep, whose checkpoints and TensorBoard events this one "
                            f"would mix with; choose a new folder for the sweep.")
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"{key}={path} is a folder of other files ({shown}), which a run could overwrite; choose a "
                        f"new or empty folder.")
    raise UserError(f"{key}={path} keeps disappearing while it is being claimed; choose another folder.")


def writable(found: Claim, key: str) -> None:
    """Refuse a folder this process cannot write (read-only, another user's), found by trying: permission bits
    say nothing to root, nor about a read-only file system."""
    try:
        probe = found.path / f".write-test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        found.release()
        raise UserError(f"{key}={found.path} cannot be written ({exc.strerror or type(exc).__name__}); choose a "
                        f"folder you can write to.") from None


def lock_existing(path: str | Path, key: str = "resume") -> Claim:
    """Lock a run folder that is continued, so two processes never continue the same run at once."""
    path = Path(os.path.abspath(path))
    fd = _lock(path)
    if fd is None:
        raise UserError(f"{key}={path} is being written by another process right now; wait for it to end, then "
                        f"give the same command again.")
    claim = Claim(path, fd)
    writable(claim, key)
    return claim


def lock_job(path: Path) -> Claim:
    """Lock a sweep job's folder (Hydra made it, empty, in the claimed sweep folder); refused if another job has
    it or wrote into it."""
    fd = _lock(path)
    if fd is None or any(path.iterdir()):
        if fd is not None:
            os.close(fd)
        raise UserError(f"{path} already belongs to another job of this sweep; keep ${{hydra.job.num}} in "
                        f"hydra.sweep.subdir so that every job gets its own folder.")
    return Claim(path, fd)
