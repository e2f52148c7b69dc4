"""One writer per workdir: a second training run is refused in one line naming the holder, the lock goes with its
process (normal exit or kill -9), and readers of a trained workdir are not affected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_core.errors import UserError
from lm_core.workdir_lock import WorkdirLock, lock_path
from tests.test_train_reliability import REPO, assert_clean_failure, train

HOLD = ("import sys, time\nfrom lm_core.workdir_lock import WorkdirLock\nWorkdirLock(sys.argv[1]).acquire()\n"
        "print('locked', flush=True)\ntime.sleep(600)\n")


def hold_lock(workdir: Path) -> subprocess.Popen:
    """Another process holding the workdir's lock, as a running training run does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def kill_9(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_second_holder_is_refused_naming_the_workdir_and_the_holder(tmp_path):
    workdir = tmp_path / "run"
    with WorkdirLock(workdir) as first:
        first.acquire()
        assert f"pid {os.getpid()}" in lock_path(workdir).read_text()
        with pytest.raises(UserError, match=f"{workdir} is in use by another training run \\(pid {os.getpid()}"):
            WorkdirLock(workdir).acquire()
    assert lock_path(workdir).read_text() == ""  # released: nothing names a holder any more
    with WorkdirLock(workdir) as second:
        second.acquire()
        assert second.held


def test_create_false_leaves_a_missing_workdir_missing(tmp_path):
    lock = WorkdirLock(tmp_path / "missing")
    lock.acquire(create=False)
    assert not lock.held and not (tmp_path / "missing").exists()


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
    workdir = tmp_path / "run"
    holder = hold_lock(workdir)
    with pytest.raises(UserError, match=f"pid {holder.pid}"):
        WorkdirLock(workdir).acquire()
    kill_9(holder)
    with WorkdirLock(workdir) as lock:  # the stale file is still there; the kernel dropped the lock with the process
        lock.acquire()
        assert lock.held


@pytest.mark.slow
def test_second_training_run_exits_2_in_one_line_and_readers_still_work(tmp_path):
    from lm_core.trained_runs import load_trained_model

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    for index in range(24):
        (corpus_dir / f"{index}.txt").write_text(f"document {index}: " + "a small test corpus. " * 60)
    corpus = f"files:{corpus_dir}/*.txt"
    workdir = tmp_path / "run"
    first = train(workdir, corpus, "--config.steps=2", "--config.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    with WorkdirLock(workdir) as lock:  # released after the normal exit
        lock.acquire()

    holder = hold_lock(workdir)
    try:
        second = train(workdir, corpus, "--config.steps=4", "--config.checkpoint_every=2")
        assert_clean_failure(second, str(workdir), f"pid {holder.pid}", "another --workdir")
        assert not (workdir / "checkpoints" / "4").exists()
        _, _, step = load_trained_model(workdir)  # what sampling and evaluation read: no lock taken
        assert step == 2
    finally:
        kill_9(holder)
