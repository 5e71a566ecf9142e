"""The one exception type whose message is shown to the user as is: one sentence, no traceback."""


class UserError(Exception):
    """Bad input from the user: the message names the input and the fix."""
