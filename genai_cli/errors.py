"""The one exception type the CLI turns into a one-line message (no traceback)."""


class GenaiError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""
