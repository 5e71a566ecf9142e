"""The one exception type whose message is shown to the user as is: one sentence, no traceback."""
import errno
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: the message names the input and the fix."""


def fail(message: str, code: int = 2):
    """Print `error: message` on stderr, on one line whatever the paths in it hold, and exit with `code` (2: refused
    input)."""
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


@contextmanager
def refusals():
    """Around an entry point's work: a UserError, or a path too long for the file system, ends the command in one
    sentence with exit status 2."""
    try:
        yield
    except UserError as exc:
        fail(str(exc))
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        fail(f"{exc.filename} is too long a path for this file system; choose a shorter name.")
