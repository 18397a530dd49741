"""The one exception type users see: its message is a single line naming the problem and the fix."""


class TokendynError(Exception):
    """A user-facing error. The CLI prints its message on one line (traceback only with --debug)."""
