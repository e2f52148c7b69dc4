"""One training run per workdir: an advisory `fcntl.flock` on `workdir/.lock`, held while `trainer.train` runs.

Two writers in one workdir would interleave checkpoints and metrics rows of different runs. The kernel releases a
flock when its process exits in any way (kill -9 included), so a lock file left behind by a dead run never blocks;
the file itself stays (deleting it would let a third run lock a fresh file while a second still holds the old one)
and names its holder (pid, host) while held. Readers (`load_trained_model`, sampling, evaluation) never take it.

Multi-host: each process of a run locks its own file (process 0 `.lock`, process i `.lock.<i>`), so on a shared
filesystem a second run is refused on every host instead of only on host 0 while the others wait in a collective.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from lm_core.errors import UserError


def lock_path(workdir: Path, process_index: int = 0) -> Path:
    return workdir / (".lock" if process_index == 0 else f".lock.{process_index}")


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the lock for the block; `acquire` may also be called inside it
    (`create=False` locks only a workdir that exists, so a run rejected for bad input creates nothing)."""

    def __init__(self, workdir: str | Path, process_index: int = 0) -> None:
        self.workdir = Path(workdir).absolute()
        self.path = lock_path(self.workdir, process_index)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, create: bool = True) -> None:
        """Take the lock (no-op when held); a UserError naming the holder when another run has it."""
        if self.held or (not create and not self.workdir.is_dir()):
            return
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise UserError(f"cannot create the lock file {self.path} ({error.strerror}); --workdir must be a "
                            "writable directory") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise UserError(f"{self.workdir} is in use by another training run ({holder}, lock {self.path}); "
                            "wait for it to finish or use another --workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # while still held: a later holder's line is never truncated
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
