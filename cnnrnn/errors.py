"""The one exception type whose message is shown to the user as is: one sentence, no traceback."""
import sys


class UserError(Exception):
    """Bad input from the user: the message names the input and the fix."""


def fail(message: str, code: int = 2):
    """Print `error: message` on stderr and exit with `code` (2: refused input)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
