"""Two local processes (CPU collectives over gloo) train exactly like one process."""

import csv
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import sweep_config_text

WORKER = r"""
import sys
import numpy as np
import jax
from lm_core import distributed
process_id, num_processes, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if num_processes > 1:
    distributed.initialize(f"localhost:{port}", num_processes, process_id)
from flax import nnx
from lm_core import loss, optim, train_step
from lm_core.model import Transformer
from lm_core.sharding import MeshConfig, make_mesh
sys.path.insert(0, sys.argv[4])
from tests.helpers import random_batch, tiny_config
optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0))
mesh = make_mesh(MeshConfig(data=-1))
graphdef, state, shardings = train_step.init_train_state(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)),
                                                         optimizer, mesh, 0)
step = train_step.make_train_step(graphdef, loss.next_token_loss, optimizer, mesh, shardings)
rows = 8 // jax.process_count()
for i in range(3):
    full = random_batch(i)
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in full.items()}
    state, metrics = step(state, distributed.global_batch(mesh, local))
    print("LOSS", i, repr(float(metrics["loss"])), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(tmp_path: Path, count: int) -> list[list[float]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(count), port, repo], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(count)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        results.append([float(line.split()[2]) for line in out.splitlines() if line.startswith("LOSS")])
    return results


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = run_processes(tmp_path, 1)[0]
    both = run_processes(tmp_path, 2)
    assert len(single) == 3
    for losses in both:
        assert losses == pytest.approx(single, rel=1e-5)


TRAIN_FLAGS = ["--config.data.tokenizer=byte", "--config.model.vocab_size=260", "--config.model.d_model=32",
               "--config.model.num_layers=2", "--config.model.num_heads=2", "--config.data.seq_len=32",
               "--config.data.global_batch_size=4", "--config.eval_every=0", "--config.checkpoint_every=1000",
               "--config.log_every=1"]


def start_train_lm(workdir: Path, steps: int, port: str, logs: Path) -> list[subprocess.Popen]:
    """experiments.train_lm as a 2-process job (LM_CORE_* variables, one CPU device each)."""
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                   LM_CORE_COORDINATOR=f"localhost:{port}", LM_CORE_NUM_PROCESSES="2", LM_CORE_PROCESS_ID=str(i))
        log = open(logs / f"process{i}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.train_lm", f"--workdir={workdir}",
                                       f"--config.steps={steps}", *TRAIN_FLAGS], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1]))
    return procs


@pytest.mark.slow
def test_a_grain_fed_run_resumes_exactly_from_2_processes_to_1_and_back_to_2(tmp_path):
    # Each process builds only its rows of a tokens:DIR dataset (lm_core.data.grain_pipeline); the saved position
    # is the global stream's, so a job on another process count continues on the same data.
    from lm_core.data.prepared import prepare
    from lm_core.metrics import read_metrics

    prepare(text_corpus(tmp_path / "corpus", 30), "byte", tmp_path / "tokens")
    flags = (*TRAIN_FLAGS, f"--config.data.source=tokens:{tmp_path / 'tokens'}", "--config.checkpoint_every=2",
             "--config.optimizer.total_steps=6")  # the same schedule whatever --config.steps says
    def train_lm(run: str, steps: int, count: int) -> None:
        run_entrypoint_job("experiments.train_lm", [f"--workdir={tmp_path / run}", f"--config.steps={steps}",
                                                    *flags], count, tmp_path)

    train_lm("straight", 6, 1)
    for steps, count in [(2, 2), (4, 1), (6, 2)]:
        train_lm("moved", steps, count)
    def losses(run: str) -> list[float]:
        return [row["loss"] for row in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in row]

    assert len(losses("straight")) == 6
    assert losses("moved") == pytest.approx(losses("straight"), rel=1e-5)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_every_process_and_resumes(tmp_path):
    # Without an agreed step the signalled process waits in its collective save for the other, which trains on:
    # the job hangs. JAX's preemption service makes both save the same step (lm_core.trainer.StopRequested).
    import time

    workdir = tmp_path / "run"
    procs = start_train_lm(workdir, 200, str(free_port()), tmp_path)
    deadline = time.monotonic() + 180
    while (tmp_path / "process1.log").read_text().count("\nstep ") < 5 and time.monotonic() < deadline:
        assert procs[1].poll() is None, (tmp_path / "process1.log").read_text()[-3000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=120) for proc in procs]
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [143, 143], logs[1][-3000:]
    saved = [re.search(r"saved checkpoint at step (\d+)", log).group(1) for log in logs]
    assert saved[0] == saved[1] and (workdir / "checkpoints" / saved[0]).is_dir()
    procs = start_train_lm(workdir, int(saved[0]) + 3, str(free_port()), tmp_path)
    assert [proc.wait(timeout=180) for proc in procs] == [0, 0], (tmp_path / "process0.log").read_text()[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / saved[0]}" in (tmp_path / "process0.log").read_text()


@pytest.mark.parametrize(("count", "index", "fragment"), [("abc", "0", "are not integers"),
                                                          ("2", "5", "a process id in 0..N-1")])
def test_bad_process_variables_are_one_line_exit_2_for_every_entrypoint(count, index, fragment, tmp_path):
    env = dict(os.environ, LM_CORE_COORDINATOR="localhost:1", LM_CORE_NUM_PROCESSES=count, LM_CORE_PROCESS_ID=index)
    for module in ("experiments.sample", "experiments.vocab_scaling.sweep", "experiments.kv_prediction.train"):
        done = subprocess.run([sys.executable, "-m", module, f"--workdir={tmp_path / 'w'}"], env=env,
                              capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1 and fragment in errors[0], (module, done.stderr[-2000:])
    assert not (tmp_path / "w").exists()


def run_entrypoint_job(module: str, args: list[str], count: int, logs: Path) -> list[str]:
    """`python -m module args` as a `count`-process job (one CPU device each); the processes' outputs."""
    port, procs = str(free_port()), []
    for i in range(count):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
                   LM_CORE_COORDINATOR=f"localhost:{port}", LM_CORE_NUM_PROCESSES=str(count),
                   LM_CORE_PROCESS_ID=str(i), LM_CORE_CACHE=str(logs / "cache"))
        log = open(logs / f"{module}.{count}.{i}.log", "w")  # noqa: SIM115 - closed with the process below
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1]))
    codes = [proc.wait(timeout=600) for proc in procs]
    outputs = [(logs / f"{module}.{count}.{i}.log").read_text() for i in range(count)]
    assert codes == [0] * count, outputs[0][-3000:] + outputs[-1][-3000:]
    return outputs


def text_corpus(folder: Path, documents: int) -> str:
    from pydoc_data.topics import topics

    folder.mkdir()
    for name in sorted(topics)[:documents]:
        (folder / f"{name}.txt").write_text(topics[name])
    return f"files:{folder}/*.txt"


SWEEP = dict(groups=(dict(name="a", d_model=32, num_layers=1, num_heads=2, d_ff=64),), vocab_sizes=(384, 448),
             budgets=(2e9,), min_steps=5, warmup_fraction=0.1, evals_per_run=1, eval_chars=10_000)


@pytest.mark.slow
def test_a_sweep_as_two_processes_gives_the_one_process_results(tmp_path):
    (tmp_path / "sweep.py").write_text(sweep_config_text(text_corpus(tmp_path / "corpus", 30), **SWEEP))
    results = {}
    for count in (1, 2):
        workdir = tmp_path / f"sweep{count}"
        run_entrypoint_job("experiments.vocab_scaling.sweep", [f"--config={tmp_path / 'sweep.py'}",
                                                                f"--workdir={workdir}"], count, tmp_path)
        results[count] = list(csv.DictReader((workdir / "results.csv").read_text().splitlines()))
    assert len(results[1]) == len(results[2]) == 2
    for one, two in zip(results[1], results[2], strict=True):
        assert (one["V"], one["step"], one["C"], one["final"]) == (two["V"], two["step"], two["C"], two["final"])
        assert float(two["L_u"]) == pytest.approx(float(one["L_u"]), abs=1e-4)


@pytest.mark.slow
def test_a_kvp_pipeline_as_two_processes_gives_the_one_process_losses(tmp_path):
    from lm_core.metrics import read_metrics

    micro = ["--config.model.vocab_size=264", "--config.model.d_model=32", "--config.model.num_layers=4",
             "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.d_ff=64",
             "--config.data.tokenizer=byte", "--config.data.seq_len=32", "--config.data.global_batch_size=4",
             "--config.steps=4", "--config.kvp.steps=3", "--config.log_every=1", "--config.kvp.variants=('lp0.50',)",
             f"--config.data.source={text_corpus(tmp_path / 'corpus', 12)}"]
    losses = {}
    for count in (1, 2):
        workdir = tmp_path / f"kvp{count}"
        run_entrypoint_job("experiments.kv_prediction.train", [f"--workdir={workdir}", *micro], count, tmp_path)
        losses[count] = {run: [row["loss"] for row in read_metrics(workdir / run / "metrics.jsonl") if "loss" in row]
                         for run in ("base", "kvp_lp0.50", "aux_lp0.50")}
    assert [len(losses[1][run]) for run in losses[1]] == [4, 3, 3]
    for run, values in losses[1].items():
        assert losses[2][run] == pytest.approx(values, rel=1e-5), run


@pytest.mark.slow
def test_an_upcycled_moma_run_as_two_processes_gives_the_one_process_losses(tmp_path):
    # The upcycled weights come from a model loaded on one process-local device: each process places its shards.
    # Two routing groups in both jobs (by default there is one per batch shard: 1 in 1 process, 2 in 2).
    from lm_core.metrics import read_metrics
    from tests.helpers import moma_micro_flags

    seed, vq = tmp_path / "moe_1t1i", tmp_path / "vq"
    run_entrypoint_job("experiments.moma.train", [f"--workdir={seed}", *moma_micro_flags(vq, "moe_1t1i", 2)], 1,
                       tmp_path)
    losses = {}
    for count in (1, 2):
        workdir = tmp_path / f"up{count}"
        upcycle = [f"--config.moma.upcycle_from={seed}", "--config.moma.routing_groups=2"]
        run_entrypoint_job("experiments.moma.train",
                           [f"--workdir={workdir}", *moma_micro_flags(vq, "moe_2t2i", 3, *upcycle)], count, tmp_path)
        losses[count] = [row["loss"] for row in read_metrics(workdir / "metrics.jsonl") if "loss" in row]
    assert len(losses[1]) == 3
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
