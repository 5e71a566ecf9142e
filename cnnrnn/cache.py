"""A folder of entries kept between runs and shared by processes (the per-item readers, the decoded pictures of a
user's folders). An entry is built in `.NAME.partial` under a lock, published whole by one rename and checked when
it is read; a cache that may not be written still serves the entries it has."""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path

from cnnrnn.errors import UserError

log = logging.getLogger("cnnrnn")


def open_lock(path: Path, what: str) -> int:
    """A descriptor of the lock file at `path`, created if missing: never through a link, never truncated, so a
    link planted there cannot make us write to its target. `what` names the setting in the sentences."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        why = {errno.ELOOP: "is a link", errno.EISDIR: "is a folder", errno.EACCES: "cannot be written by you",
               errno.EPERM: "cannot be written by you", errno.EROFS: "is on a read-only file system"}.get(
                   exc.errno, exc.strerror)
        raise UserError(f"{what}: the lock file {path} {why}; remove it, or choose another folder for "
                        f"{what}.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{what}: the lock file {path} is not a regular file; remove it, or choose another folder.")
    return fd


@contextmanager
def locked(path: Path, what: str):
    """Hold an exclusive lock on `path` (a lock file); while another process holds it, say that this one waits
    and for which process (its pid is in the file)."""
    fd = open_lock(path, what)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            log.info("waiting for process %s, which is building %s; this run goes on once it is done", holder,
                     path.name[1:].removesuffix(".lock"))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the lock


class Cache:
    """Entries under `root`; `what` names the setting that chose the folder (e.g. reader.cache)."""

    def __init__(self, root: str | Path, what: str):
        self.root, self.what = Path(root), what

    def entry(self, name: str) -> Path:
        return self.root / name

    def partial(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    def done(self, name: str) -> bool:
        return self.entry(name).is_dir()

    def check(self, name: str) -> None:
        """Before any work: an entry to read, or a folder where it can be built; one sentence if neither."""
        try:
            if self.done(name):
                return
            self.root.resolve(strict=False)
        except (OSError, RuntimeError) as exc:  # a link loop
            raise UserError(f"{self.what}={self.root} cannot be used ({exc}); choose another folder.") from None
        above = self.root
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise UserError(f"{self.what}={self.root}: {above} is a file, not a folder; choose another folder.")
        if not os.access(above, os.W_OK | os.X_OK):
            raise UserError(f"{self.what}={self.root} cannot be written, and {name} is not in it yet; choose a "
                            f"folder you can write to.")
        lock = self.root / f".{name}.lock"
        if lock.is_symlink() or lock.exists() and not lock.is_file():
            raise UserError(f"{self.what}: {lock} is not a lock file of ours; remove it, or choose another folder.")

    @contextmanager
    def building(self, name: str):
        """Lock the entry `name` and yield its partial folder (None if it was published meanwhile); publish the
        partial folder by one rename when the block ends without an error."""
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root / f".{name}.lock", self.what):
            if self.done(name):
                yield None
                return
            partial = self.partial(name)
            partial.mkdir(exist_ok=True)
            yield partial
            os.rename(partial, self.entry(name))
