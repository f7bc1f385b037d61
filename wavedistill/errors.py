"""User-facing errors.

A :class:`UserError` is a problem with what the user gave us (a path, a config,
a checkpoint).  The CLI prints its message on one line and exits with code 2;
nothing else in the package prints tracebacks for such problems.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do."""

    exit_code = 2


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite training steps."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM; ``code`` is the exit status (130 or 143) and the message says what was kept."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code
