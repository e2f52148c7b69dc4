"""Orbax checkpoints of the train state, the data position and the run's config.

A checkpoint directory `workdir/checkpoints/<step>/` holds three items:
- `state`: the `TrainState` pytree (params, optimizer state, step, RNG), restorable onto any mesh because the
  caller passes the target shardings;
- `data`: the data loader's position (JSON), so a resumed run sees exactly the batches it would have seen;
- `meta`: the model config and anything else the run wants to check before resuming (JSON).
Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest; we never fall back to a fresh start when a checkpoint exists but cannot be read.
A save is proven possible before Orbax starts it (`prove_writable`): when Orbax cannot create a step directory
its background threads wait ~300 s for a signal that never comes, and the run would only fail at its end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm_core.config import ModelConfig
from lm_core.distributed import answer_of_process_0
from lm_core.errors import UserError


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    data: dict[str, Any]
    meta: dict[str, Any]


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, save_every: int = 0):
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._saving = self.directory  # the latest save started (workdir/checkpoints/<step>), named if it fails
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    def save(self, step: int, state: Any, data: dict[str, Any], meta: dict[str, Any], *, wait: bool = False) -> None:
        """Start saving (asynchronously: training continues while the files are written).

        A failure raises UserError: now when the directory is not writable, at the next `raise_if_save_failed`,
        `save` or `wait` when the background write fails."""
        if step in self.manager.all_steps():
            return
        prove_writable(self.directory)
        self._saving = self.directory / str(step)
        with _save_failures(self._saving):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)))
        if wait:
            self.wait()

    def raise_if_save_failed(self) -> None:
        """Without waiting: UserError if a background save has failed (the trainer asks after every step)."""
        with _save_failures(self._saving):
            self.manager.check_for_errors()

    def wait(self) -> None:
        with _save_failures(self._saving):
            self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._read_json(step, "meta")

    def read_data(self, step: int) -> dict[str, Any]:
        """The data position alone, e.g. for a new run that continues another run's stream (upcycling)."""
        return self._read_json(step, "data")

    def _read_json(self, step: int, item: str) -> dict[str, Any]:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as error:  # noqa: BLE001 - any failure to read means the checkpoint is unusable
            raise UserError(f"checkpoint {self.directory / str(step)} is unreadable ({_short(error)}); move it "
                            "away to start from the previous one") from error

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restore `step` into the structure, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
        meta = self.read_meta(step)
        with _restore_failures(self.directory / str(step)):
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        return Restored(step, restored.state, restored.data, meta)

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters of `step`'s state, into the structure, dtypes and shardings of `abstract_params`
        (ShapeDtypeStructs): the optimizer moments (2x the parameters under Adam) are never read, and every
        parameter lands directly on its target devices."""
        item = {"params": abstract_params}
        with _restore_failures(self.directory / str(step)):
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return restored.state["params"]

    def close(self) -> None:
        self.wait()
        self.manager.close()


@contextlib.contextmanager
def _save_failures(where: Path) -> Iterator[None]:
    """Turns an exception of an Orbax save into one line naming the checkpoint and the reason."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the filesystem said, the save did not happen
        raise UserError(f"saving checkpoint {where} failed ({_short(error)}); free space or fix the permissions "
                        "of that directory, then rerun the same command to resume") from error


@contextlib.contextmanager
def _restore_failures(where: Path) -> Iterator[None]:
    """Turns an exception of an Orbax restore into one line naming the checkpoint."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure to restore means this checkpoint is unusable here
        raise UserError(f"checkpoint {where} could not be restored ({_short(error)}); it is corrupted or from a "
                        "different model; move it away to use an older one") from error


CHECKPOINTS = "checkpoints"  # a run's checkpoint directory, inside its workdir


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` has started saving (its checkpoint directory exists; it may still be empty)."""
    return (Path(run_dir) / CHECKPOINTS).is_dir()


def latest_checkpoint(run_dir: str | Path, *, hint: str) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the latest checkpoint of the run in `run_dir`, or a UserError ending in `hint` (what to run
    to train it) when it has none. Only reads: a reader never creates a checkpoint directory in another's run."""
    directory = Path(run_dir) / CHECKPOINTS
    step, meta = latest_meta(directory)
    if step is None:
        state = "holds no checkpoint yet" if directory.is_dir() else "is missing"
        raise UserError(f"{run_dir} is not trained yet ({directory} {state}); {hint}")
    return step, meta


def latest_meta(directory: Path) -> tuple[int | None, dict[str, Any]]:
    """(latest step, its meta) of the checkpoint directory `directory`; (None, {}) when it holds none or is absent
    (it is never created here)."""
    if not exists_on_process_0(directory):
        return None, {}
    checkpointer = Checkpointer(directory)
    try:
        step = checkpointer.latest_step()
        return step, checkpointer.read_meta(step) if step is not None else {}
    finally:
        checkpointer.close()


def exists_on_process_0(directory: Path) -> bool:
    """Whether process 0 sees `directory`, the same answer on every process. Opening a Checkpointer is a collective
    (Orbax syncs the processes), so all must take the same branch: a checkpoint directory that process 0 is
    creating meanwhile (lm_core.trainer's `_prepare_workdir`) must not split them."""
    return answer_of_process_0(directory.is_dir())


def prove_writable(directory: Path) -> None:
    """Create `directory` and write and delete a probe file in it, or raise UserError saying why not."""
    probe = directory / f".write_probe.{socket.gethostname()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as error:
        reason = "it exists and is not a directory" if directory.exists() and not directory.is_dir() else (
            error.strerror or type(error).__name__)
        raise UserError(f"cannot write checkpoints to {directory} ({reason}); the checkpoint directory must be "
                        "a writable directory: move the file away or fix its permissions") from error


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with target shardings: what `Checkpointer.restore` needs to place arrays on a mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def check_same_model(saved: dict[str, Any], config: ModelConfig, directory: Path) -> None:
    """Refuse to resume a checkpoint written for another model, naming the fields that differ."""
    try:
        saved_config = ModelConfig.from_dict(saved["model"])
    except (KeyError, TypeError, UserError) as error:
        raise UserError(f"checkpoint in {directory} has no readable model config ({error})") from error
    differing = config.differing_fields(saved_config)
    if differing:
        details = ", ".join(f"{name}: checkpoint {getattr(saved_config, name)!r} vs config "
                            f"{getattr(config, name)!r}" for name in differing)
        layout = (" (scan_layers stores the blocks' parameters stacked, unrolled models one set per layer: set "
                  "it as the checkpoint has it)") if "scan_layers" in differing else ""
        raise UserError(f"{directory} holds a checkpoint of a different model ({details}){layout}; use another "
                        "--workdir or the matching config")


def _short(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
