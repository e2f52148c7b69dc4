"""What every entrypoint shares: absl flag parsing and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

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


def define_config_file(name: str, default: str | None, help_string: str, **kwargs: Any) -> Any:
    """`config_flags.DEFINE_config_file`, with its errors as one line and exit 2: it reads the command line's
    --<name>.<field> overrides as it is defined (at import), so an unknown field fails there, before `run`."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (KeyError, AttributeError) as error:
        overrides = [arg.split("=")[0] for arg in sys.argv if arg.startswith(f"--{name}.")]
        fail(f"{', '.join(overrides) or f'--{name}.<field>'}: no such field in the config ({_last_reason(error)}); "
             f"valid: the fields its get_config() defines")
    except (ValueError, TypeError, OSError, SyntaxError) as error:
        fail(f"--{name}: {one_line(error)}")


def _last_reason(error: BaseException) -> str:
    """The innermost line of a config error ("[Errno 2] No such file ...", "'nonexistent'")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(error).__name__
    while len(reason) > 1 and reason[0] == reason[-1] and reason[0] in "\"'":  # KeyError quotes its key twice
        reason = reason[1:-1]
    return reason


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
        _refuse_url_paths()
        _load_config_flags()
        return remaining
    except (flags.Error, KeyError, ValueError, TypeError, AttributeError, OSError, SyntaxError) as error:
        # absl would print the whole usage and exit 1; a user wants the one line that names the bad flag.
        fail(one_line(error))
        raise  # unreachable: fail() exits


URL_PATH_FLAGS = ("workdir", "out")  # the paths entrypoints write to


def _refuse_url_paths() -> None:
    """A gs://-style URL given as --workdir or --out is refused in one line: every file a run writes goes through
    pathlib, which would turn gs://bucket/run into a local directory named gs:/bucket/run."""
    for name in URL_PATH_FLAGS:
        value = flags.FLAGS[name].value if name in flags.FLAGS else None
        if isinstance(value, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ValueError(f"--{name}={value}: URL paths are not supported (runs read and write local paths); "
                             "valid: a local path, or the bucket mounted as a directory (e.g. with gcsfuse)")


def _load_config_flags() -> None:
    """Load every --config file and apply its --config.<field> overrides now, so a missing file, a syntax error
    or an unknown field is one line here and not a traceback from inside the entrypoint."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if config_flags.is_config_flag(flag):
            if flag.value is None:  # an optional config file that was not given
                continue
            try:
                # A file that failed to load is a stand-in that raises on first use: use it now.
                flag.value.keys  # noqa: B018
            except Exception as error:  # noqa: BLE001 - a config file may raise anything; report it as one line
                raise ValueError(f"--{name}={flag.serialize().split('=', 1)[-1]}: {_last_reason(error)}") from error


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
