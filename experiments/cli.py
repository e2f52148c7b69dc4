"""What every entrypoint shares: absl flag parsing and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from lm_core.errors import RunStopped, UserError

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 143  # 128 + SIGTERM, as a process killed by it


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def flag_given(name: str, argv: list[str] | None = None) -> bool:
    """True when the command line sets --name or an override --name.<field> (e.g. to prefer a saved config)."""
    return any(arg == f"--{name}" or arg.startswith((f"--{name}=", f"--{name}.")) for arg in argv or sys.argv)


def one_line(error: Exception) -> str:
    """A config file's error arrives as "Error whilst parsing config file:" + a traceback whose last line is the
    reason; keep the first and last lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return repr(error)
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError) as error:
        # absl would print the whole usage and exit 1; a user wants the one line that names the bad flag.
        fail(one_line(error))
        raise  # unreachable: fail() exits


def _join_multi_process_run() -> None:
    """Every entrypoint joins a multi-host job when LM_CORE_NUM_PROCESSES says there is one (lm_core.distributed);
    jax is imported only then, so the pure-numpy entrypoints stay quick."""
    if "LM_CORE_NUM_PROCESSES" in os.environ:
        from lm_core import distributed

        distributed.initialize()


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with bad flags and `UserError`s reported as one line and exit code 2."""

    def guarded(argv: list[str]) -> None:
        logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the progress output
        try:
            _join_multi_process_run()
            main(argv)
        except UserError as error:
            fail(str(error))
        except RunStopped as stopped:  # the run saved its checkpoint and said so; rerun the command to resume
            print(f"stopped: {stopped}", file=sys.stderr, flush=True)
            sys.exit(EXIT_STOPPED)
        except FloatingPointError as error:  # lm_core.errors.TrainingDiverged: not the input, still one line
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    app.run(guarded, flags_parser=_parse_flags)
