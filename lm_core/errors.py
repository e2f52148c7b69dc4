"""The one exception type for mistakes a user can make (config, data, checkpoint).

Entrypoints catch `UserError`, print its message as one line and exit with code 2, `TrainingDiverged` with exit
code 1 and `RunStopped` with exit code 143; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A bad value the user supplied; the message names it and says what would be valid."""


class RunStopped(Exception):
    """A signal stopped a training run of a pipeline (checkpoint saved): the pipeline stops too, rather than
    going on to runs built on an unfinished one. Entrypoints exit with code 143 (128 + SIGTERM)."""


class TrainingDiverged(FloatingPointError):
    """A train step's objective, gradient norm or updated parameters were not finite: the step was not applied and
    the last finite state is the newest checkpoint. Entrypoints print the one-line message and exit with code 1."""


def brief(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (whitespace collapsed), at most `limit` characters: for quoting a
    library's error inside a UserError's one line."""
    return " ".join(str(error).split())[:limit] or type(error).__name__
