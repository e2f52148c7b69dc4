"""Optional Weights & Biases writer: every metrics.jsonl row also goes to one W&B run, offline by default.

metrics.jsonl stays the run's source of truth; W&B is a view of it for people who compare runs there. `wandb` is
an optional dependency (`pip install wandb`), imported only when `config.log.wandb` is true. The run id is kept in
`workdir/wandb_run_id`, so a resumed run continues the same W&B run. In offline mode nothing touches the network
and no login is asked for; `wandb sync <workdir>/wandb/offline-run-*` uploads the segments of a resumed run into
that one run, in order.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import secrets
from pathlib import Path
from typing import Any

from lm_core.atomic_files import write_text_atomically
from lm_core.errors import UserError

MODES = ("offline", "online", "disabled")
RUN_ID_FILE = "wandb_run_id"
DEFAULTS: dict[str, Any] = dict(wandb=False, wandb_project="lm_core", wandb_mode="offline", wandb_run_name="")


@dataclasses.dataclass(frozen=True)
class WandbOptions:
    """What `wandb.init` gets for a run: its project, mode, display name and the run's whole config."""

    project: str
    mode: str
    run_name: str  # "" = the workdir's name
    run_config: dict[str, Any]


def log_fields(config: Any) -> dict[str, Any]:
    """`config.log` over the defaults, so a config built without a `log` block (an older one) reads as W&B off."""
    log = config.get("log") if hasattr(config, "get") else None
    values = log.to_dict() if hasattr(log, "to_dict") else dict(log or {})
    return {**DEFAULTS, **values}


def check_log_config(config: Any) -> None:
    """Refuse bad `config.log.*` values in one line, and a W&B run when wandb is not installed, before any work."""
    fields = log_fields(config)
    unknown = sorted(set(fields) - set(DEFAULTS))
    if unknown:
        raise UserError(f"log.{unknown[0]} is not a log field; valid: {', '.join(sorted(DEFAULTS))}")
    if not isinstance(fields["wandb"], bool):
        raise UserError(f"log.wandb={fields['wandb']!r} must be True or False")
    if fields["wandb_mode"] not in MODES:
        raise UserError(f"log.wandb_mode={fields['wandb_mode']!r} is unknown; valid: {', '.join(MODES)}")
    if not isinstance(fields["wandb_project"], str) or not fields["wandb_project"].strip():
        raise UserError(f"log.wandb_project={fields['wandb_project']!r} must be a non-empty string")
    if not isinstance(fields["wandb_run_name"], str):
        raise UserError(f"log.wandb_run_name={fields['wandb_run_name']!r} must be a string (\"\" = the workdir's name)")
    if fields["wandb"] and importlib.util.find_spec("wandb") is None:
        raise UserError("log.wandb=True needs the wandb package, which is not installed: pip install wandb "
                        "(or set log.wandb=False)")


def wandb_options(config: Any) -> WandbOptions | None:
    """The W&B options of a validated run config, or None when `config.log.wandb` is off."""
    fields = log_fields(config)
    if not fields["wandb"]:
        return None
    return WandbOptions(project=fields["wandb_project"], mode=fields["wandb_mode"],
                        run_name=fields["wandb_run_name"], run_config=config.to_dict())


def stable_run_id(workdir: Path) -> str:
    """The W&B run id of this workdir: read from `workdir/wandb_run_id`, created there on the first run."""
    path = workdir / RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids allow [a-z0-9_-]; 8 hex digits as W&B's own are 8 base-36 digits
    write_text_atomically(path, run_id + "\n")
    return run_id


class WandbWriter:
    """One W&B run per workdir (process 0 only): `write` logs a metrics row at its step, `close` finishes the run."""

    def __init__(self, workdir: Path, options: WandbOptions):
        import wandb

        # console="off": W&B does not wrap stdout/stderr, so the progress lines and one-line errors stay as they are
        settings = wandb.Settings(console="off")
        try:
            self._run = wandb.init(
                project=options.project, name=options.run_name or workdir.name, id=stable_run_id(workdir),
                resume="allow", dir=str(workdir),  # wandb writes into <dir>/wandb
                mode=options.mode, config=options.run_config,
                reinit="create_new",  # never log into another run this process has open (a sweep, a notebook)
                settings=settings)
        except wandb.errors.Error as error:
            message = " ".join(str(error).split())
            raise UserError(f"wandb.init failed (log.wandb_mode={options.mode!r}): {message}; for a run without "
                            "network or login use log.wandb_mode=offline") from error

    def write(self, row: dict[str, Any]) -> None:
        """Log the row's values at W&B step = the training step, so W&B's x-axis is the one of metrics.jsonl.

        W&B wants increasing steps, and a run killed after logging but before its next checkpoint logs those steps
        again on resume (see MetricsLog): online, W&B tells the resumed run the step it holds and rows below it are
        skipped here; offline, each attempt's folder holds what that attempt logged."""
        step = int(row["step"])
        if step < self._run.step:
            return
        self._run.log({name: value for name, value in row.items() if name != "step"}, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run; exit_code 0 = done, 1 = diverged, 143 = stopped by a signal (W&B shows it as failed until
        the resumed run finishes)."""
        self._run.finish(exit_code=exit_code)
