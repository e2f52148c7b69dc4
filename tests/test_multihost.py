"""Two local processes (CPU collectives over gloo) train exactly like one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
