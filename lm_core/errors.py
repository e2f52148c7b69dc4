"""The one exception type for mistakes a user can make (config, data, checkpoint).

Entrypoints catch `UserError`, print its message as one line and exit with code 2;
everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A bad value the user supplied; the message names it and says what would be valid."""
