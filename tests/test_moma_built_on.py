"""MoMa runs built on other runs: an upcycled run on its moe_1t1i seed, auxiliary routers on the run they route for.
Each records the state of what it was built on (built_on: step and loss); once that has trained on, a rerun is
refused in one line naming both states, and while it is unchanged the run resumes (or the routers are reused)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lm_core.checkpoint import latest_meta
from lm_core.errors import UserError
from lm_core.metrics import read_metrics
from lm_core.trained_runs import check_same_meta, run_state
from tests.helpers import moma_micro_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The VQ image tokenizer (trained by the first run) and JAX's compilation cache, shared by this module's runs:
    a rerun in a new process compiles its step again, which costs far more than its few steps."""
    return tmp_path_factory.mktemp("moma_shared")


def micro(shared: Path, variant: str, steps: int, *extra: str) -> list[str]:
    return moma_micro_flags(shared / "vq", variant, steps, *extra)


def entrypoint(shared: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(shared / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.run([sys.executable, "-m", f"experiments.moma.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def train(shared: Path, workdir: Path, variant: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
    done = entrypoint(shared, "train", f"--workdir={workdir}", *micro(shared, variant, steps, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def upcycled(shared: Path, tmp_path: Path, steps: int) -> tuple[Path, Path, list[str]]:
    """A moe_1t1i seed trained 2 steps and a moe_2t2i run upcycled from it, trained `steps` steps."""
    seed, run = tmp_path / "moe_1t1i", tmp_path / "up_2t2i"
    train(shared, seed, "moe_1t1i", 2)
    upcycle = [f"--config.moma.upcycle_from={seed}"]
    train(shared, run, "moe_2t2i", steps, *upcycle)
    return seed, run, upcycle


@pytest.mark.slow
def test_an_upcycled_run_resumes_while_its_seed_is_unchanged_and_is_refused_once_it_trained_on(shared, tmp_path):
    seed, run, upcycle = upcycled(shared, tmp_path, steps=2)
    assert latest_meta(run / "checkpoints")[1]["built_on"] == {str(seed): run_state(seed)}
    assert run_state(seed).startswith("step 2, loss ")
    resumed = train(shared, run, "moe_2t2i", 3, *upcycle)
    assert f"resumed from {run / 'checkpoints' / '2'}" in resumed.stdout
    assert latest_meta(run / "checkpoints")[1]["built_on"] == {str(seed): run_state(seed)}

    train(shared, seed, "moe_1t1i", 4)  # the seed trains on: the weights and data position it handed over are gone
    for steps in (3, 4):  # neither counted as finished nor resumed
        error = one_error_line(entrypoint(shared, "train", f"--workdir={run}",
                                          *micro(shared, "moe_2t2i", steps, *upcycle)))
        assert f"{run} holds a checkpoint of a different setup (built_on: checkpoint {{'{seed}': 'step 2, loss" in error
        assert f"vs now {{'{seed}': 'step 4, loss" in error and "move the stale run away" in error
    assert latest_meta(run / "checkpoints")[0] == 3  # untouched
    assert [row["step"] for row in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_an_upcycled_checkpoint_from_before_built_on_is_accepted_on_resume(tmp_path):
    moma = {"variant": "moe_2t2i", "capacity_factor": 1.0}
    now = {"moma": moma, "built_on": {str(tmp_path / "seed"): "step 2, loss 5.0"}}
    check_same_meta({"moma": moma}, now, tmp_path)  # written before the field existed: accepted
    check_same_meta(now, now, tmp_path)
    with pytest.raises(UserError, match="built_on: checkpoint .*'step 2, loss 5.0'.* vs now .*'step 4, loss 4.0'"):
        check_same_meta(now, {"moma": moma, "built_on": {str(tmp_path / "seed"): "step 4, loss 4.0"}}, tmp_path)


@pytest.mark.slow
def test_aux_routers_of_a_run_that_trained_on_are_refused_not_reused(shared, tmp_path):
    run = tmp_path / "moe_2t2i"
    train(shared, run, "moe_2t2i", 2)
    routers = ["--steps=2", "--eval_batches=1"]
    first = entrypoint(shared, "train_aux_routers", f"--workdir={run}", *routers)
    assert first.returncode == 0, first.stderr[-3000:]
    again = entrypoint(shared, "train_aux_routers", f"--workdir={run}", *routers)
    assert again.returncode == 0 and "reusing the aux routers" in again.stdout, again.stderr[-3000:]
    train(shared, run, "moe_2t2i", 3)  # the run trains on: the routers learnt another model's selections
    error = one_error_line(entrypoint(shared, "train_aux_routers", f"--workdir={run}", *routers))
    assert "holds aux routers trained with other settings (built_on: saved {'run': 'step 2, loss" in error
    assert "vs now {'run': 'step 3, loss" in error and "move the directory away to retrain" in error
