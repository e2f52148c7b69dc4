"""The one exception type for mistakes a user can make (config, data, checkpoint).

Entrypoints catch `UserError`, print its message as one line and exit with code 2, and `RunStopped` with exit
code 143; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A bad value the user supplied; the message names it and says what would be valid."""


class RunStopped(Exception):
    """A signal stopped a training run of a pipeline (checkpoint saved): the pipeline stops too, rather than
    going on to runs built on an unfinished one. Entrypoints exit with code 143 (128 + SIGTERM)."""
