"""What every entrypoint shares: absl flag parsing and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags, logging

from lm_core.errors import UserError

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError) as error:
        # absl would print the whole usage and exit 1; a user wants the one line that names the bad flag.
        fail(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
        raise  # unreachable: fail() exits


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with bad flags and `UserError`s reported as one line and exit code 2."""

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the progress output
        try:
            main(argv)
        except UserError as error:
            fail(str(error))
        except FloatingPointError as error:  # training diverged: not the user's input, but still one clear line
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded, flags_parser=_parse_flags)
