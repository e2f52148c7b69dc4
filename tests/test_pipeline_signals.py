"""Multi-run pipelines stopped by SIGTERM in the middle: they exit 143, the interrupted run is not counted as
finished and no later run starts, and the rerun ends with exactly the results of an uninterrupted pipeline.

Each pipeline is its real entrypoint in a subprocess (`experiments.kv_prediction.train`, and the MoMa section of
`experiments.reproduce`), run once without interruption and once stopped during its second run, then rerun; the
comparison is bit-exact: every run's logged metrics (timings aside) and its whole final checkpointed state. The
vocab sweep's equivalent is `test_vocab_sweep.py::test_micro_sweep_end_to_end_and_a_stop_resumes_to_the_same_results`.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lm_core.checkpoint import latest_meta
from lm_core.metrics import read_metrics
from tests.helpers import pydoc_corpus, run_cli, step_line_after

pytestmark = pytest.mark.slow

# Logged values that measure wall-clock time; everything else a run logs must be identical after a resume.
TIMING_KEYS = ("tokens_per_s", "mfu")

MICRO_KVP = """
from experiments.configs import kvp_tiny


def get_config():
    # kvp_tiny's demo (one layer-pruned auxiliary, the knowledge + retrieval tasks) on a small corpus, shrunk until
    # its three runs (base, KVP lp0.50, aux-only lp0.50) train in seconds
    config = kvp_tiny.get_config("demo")
    config.data.source = kvp_tiny.TASK_SOURCE.removesuffix("builtin") + "files:{corpus}/*.txt"
    config.model.update(dict(vocab_size=264, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64,
                             max_seq_len=64))
    config.data.update(dict(tokenizer="byte", seq_len=32, global_batch_size=4, whole_documents=False))
    config.steps = 12
    config.log_every = 1
    config.eval_batches = 1
    config.kvp.steps = 16  # the stop lands after its first step: the later steps are the margin for the signal
    return config
"""


def pipeline_env(tmp_path: Path) -> dict[str, str]:
    """One CPU device (the test process fakes 8 for the sharding tests; these micro batches need not split, and one
    device is faster on 2 cores) and a private tokenizer cache."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                LM_CORE_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")


def latest_step(run_dir: Path) -> int | None:
    """The step of a run's newest checkpoint (None: none)."""
    return latest_meta(run_dir / "checkpoints")[0]


def saved_state(run_dir: Path) -> dict[str, np.ndarray]:
    """The whole TrainState of a run's newest checkpoint (parameters, optimizer moments, step, RNG) by key path,
    read as saved (no model needed to restore it)."""
    import jax
    import orbax.checkpoint as ocp

    step = latest_step(run_dir)
    assert step is not None, f"{run_dir} has no checkpoint"
    with warnings.catch_warnings():  # "sharding info not provided": the saved one (a single device) is what we want
        warnings.simplefilter("ignore", UserWarning)
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.restore(run_dir / "checkpoints" / str(step) / "state")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def logged_rows(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its timing entries."""
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_metrics(run_dir / "metrics.jsonl")]


def assert_same_runs(resumed: Path, uninterrupted: Path, runs: list[str]) -> None:
    """Each run in `runs` logged the same rows (losses, gradient norms, evaluations, tokens seen) and ended with a
    bit-identical checkpointed state in both pipeline directories."""
    for run in runs:
        assert latest_step(resumed / run) == latest_step(uninterrupted / run), run
        rows = logged_rows(resumed / run)
        assert rows and rows == logged_rows(uninterrupted / run), run
        state, reference = saved_state(resumed / run), saved_state(uninterrupted / run)
        assert state.keys() == reference.keys(), run
        for key, value in state.items():
            np.testing.assert_array_equal(value, reference[key], err_msg=f"{run}: {key}")


def kvp_finished(workdir: Path) -> dict[str, bool]:
    """run directory name -> whether the KVP pipeline itself counts it as finished (`pipeline.is_finished`, what
    decides that a rerun skips it), from the config the pipeline saved in `workdir`."""
    from experiments.kv_prediction.pipeline import is_finished, load_config, plan

    return {directory.name: is_finished(directory, stage, task)
            for _, directory, stage, task in plan(load_config(workdir), workdir)}


def kvp_train(config_file: Path, workdir: Path, env: dict[str, str], stop_at_run: int = 0):
    """`python -m experiments.kv_prediction.train`; with stop_at_run, SIGTERM once that run prints a step line."""
    command = [sys.executable, "-m", "experiments.kv_prediction.train", f"--config={config_file}",
               f"--workdir={workdir}"]
    return run_cli(command, env, step_line_after(f"== run {stop_at_run} of") if stop_at_run else None)


def test_kvp_pipeline_stopped_in_its_second_run_resumes_to_the_uninterrupted_results(tmp_path):
    config_file = tmp_path / "micro_kvp.py"
    config_file.write_text(MICRO_KVP.format(corpus=pydoc_corpus(tmp_path / "corpus", 24)))
    env = pipeline_env(tmp_path)
    runs = ["base", "kvp_lp0.50", "aux_lp0.50"]
    whole = kvp_train(config_file, tmp_path / "whole", env)
    assert whole.returncode == 0, whole.stdout[-3000:]
    assert kvp_finished(tmp_path / "whole") == dict.fromkeys(runs, True)

    # SIGTERM inside the KVP run (run 2 of 3): it saves its step and the pipeline exits 143 without marking it
    # finished or starting the aux-only run, which is built on the same base
    stopped = kvp_train(config_file, tmp_path / "stopped", env, stop_at_run=2)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "received SIGTERM: saved checkpoint at step" in stopped.stdout and "== run 3 of" not in stopped.stdout
    assert kvp_finished(tmp_path / "stopped") == {"base": True, "kvp_lp0.50": False, "aux_lp0.50": False}
    assert 0 < latest_step(tmp_path / "stopped" / "kvp_lp0.50") < 16
    assert not (tmp_path / "stopped" / "aux_lp0.50").exists()

    # the rerun skips the base, resumes the KVP run from its checkpoint and trains the aux-only run
    resumed = kvp_train(config_file, tmp_path / "stopped", env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "== run 1 of 3: base (finished" in resumed.stdout and "resumed from" in resumed.stdout
    assert_same_runs(tmp_path / "stopped", tmp_path / "whole", runs)


def moma_reproduce(workdir: Path, env: dict[str, str], stop_in_variant: int = 0):
    """`python -m experiments.reproduce --only=moma --scale=demo` (dense and moe_4t4i, 40 steps each); with
    stop_in_variant, SIGTERM once that variant's training prints a step line."""
    command = [sys.executable, "-m", "experiments.reproduce", "--only=moma", "--scale=demo", f"--workdir={workdir}"]
    marker = f"[moma {stop_in_variant}/2] training"
    return run_cli(command, env, step_line_after(marker) if stop_in_variant else None)


def savings_without_timings(moma_dir: Path) -> list[dict[str, Any]]:
    """savings.json's rows without the measured throughput and the run paths (which name the pipeline directory)."""
    rows = json.loads((moma_dir / "savings.json").read_text())
    return [{k: v for k, v in row.items() if k not in ("path", "tokens_per_s", "throughput_vs_dense")}
            for row in rows]


def report_without_timings(moma_dir: Path) -> list[str]:
    """REPORT.md without what measures wall-clock time: the training-time line, and the η table's columns from
    its tokens/s column on (tokens/s, throughput vs dense)."""
    lines, timed_from = [], None
    for line in (moma_dir / "REPORT.md").read_text().splitlines():
        if line.startswith("Training time"):
            continue
        cells = line.split(" | ")
        if "tokens/s" in cells:  # the η table's header
            timed_from = cells.index("tokens/s")
        elif not line.startswith("|"):  # any table has ended
            timed_from = None
        if timed_from is not None and line.startswith("| "):  # a header or data row, not the |---| separator
            line = " | ".join(cells[:timed_from])
        lines.append(line)
    return lines


def test_moma_reproduction_stopped_in_its_second_variant_resumes_to_the_uninterrupted_results(tmp_path):
    env = pipeline_env(tmp_path)
    variants = ["dense", "moe_4t4i"]
    whole = moma_reproduce(tmp_path / "whole", env)
    assert whole.returncode == 0, whole.stdout[-3000:]
    reference = tmp_path / "whole" / "moma"

    # SIGTERM while moe_4t4i trains: exit 143 with dense finished, moe_4t4i saved mid-run, and none of what is
    # built on the trained variants (aux routers, savings, report) written
    stopped = moma_reproduce(tmp_path / "stopped", env, stop_in_variant=2)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    moma = tmp_path / "stopped" / "moma"
    assert latest_step(moma / "dense") == 40 and 0 < latest_step(moma / "moe_4t4i") < 40
    assert not any((moma / name).exists() for name in ("savings.json", "REPORT.md", "moe_4t4i/aux_routers"))

    resumed = moma_reproduce(tmp_path / "stopped", env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    assert_same_runs(moma, reference, variants)
    routers = "moe_4t4i/aux_routers/results.json"
    assert json.loads((moma / routers).read_text()) == json.loads((reference / routers).read_text())
    assert savings_without_timings(moma) == savings_without_timings(reference)
    report = report_without_timings(moma)
    assert report == report_without_timings(reference) and any(line.startswith("| moe_4t4i | ") for line in report)
