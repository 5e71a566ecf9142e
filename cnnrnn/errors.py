"""The one exception type whose message is shown to the user as is: one sentence, no traceback."""
import errno
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: the message names the input and the fix."""


def fail(message: str, code: int = 2):
    """Print `error: message` on stderr, on one line whatever the paths in it hold, and exit with `code`."""
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    print(f"error: {line}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def refusal(exc: BaseException) -> str | None:
    """The sentence of a refused input: a UserError's, or of a path too long for the file system; else None."""
    if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
        return f"{exc.filename} is too long a path for this file system; choose a shorter name."
    return str(exc) if isinstance(exc, UserError) else None


@contextmanager
def refusals():
    """Around an entry point's work: a refused input ends the command in one sentence with exit status 2."""
    try:
        yield
    except (UserError, OSError) as exc:
        if refusal(exc) is None:
            raise
        fail(refusal(exc))
