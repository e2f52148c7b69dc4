"""Multi-host setup and global batches.

One process per host (or several local processes for testing): `initialize` connects them through
`jax.distributed.initialize`; afterwards `jax.devices()` lists every device of every process and one mesh spans
them all. Each process loads only its own rows of the global batch; `global_batch` stitches them into global arrays.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from lm_core.errors import UserError
from lm_core.sharding import batch_sharding

ENV_COORDINATOR = "LM_CORE_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "LM_CORE_NUM_PROCESSES"
ENV_PROCESS_ID = "LM_CORE_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run if one is configured (arguments or LM_CORE_* variables); returns whether it did.

    On clusters where JAX detects the topology itself (TPU pods, SLURM) pass nothing and set
    LM_CORE_NUM_PROCESSES=auto. CPU processes talk through gloo collectives. Every entrypoint calls this
    (experiments.cli.run); a second call is a no-op.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    requested = num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES)
    if requested is None or jax.distributed.is_initialized():
        return jax.distributed.is_initialized()
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if requested == "auto":
        jax.distributed.initialize()
    else:
        count, index = _process_numbers(requested, process_id)
        if not coordinator_address:
            raise UserError(f"{ENV_NUM_PROCESSES}={requested} needs {ENV_COORDINATOR}=host:port (process 0's "
                            "address)")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=count, process_id=index)
    return True


def _process_numbers(requested: int | str, process_id: int | None) -> tuple[int, int]:
    """(number of processes, this one's index) from the arguments / LM_CORE_* variables, or one-line UserError."""
    index = process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID)
    try:
        count = int(requested)
        index = int(index)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{ENV_NUM_PROCESSES}={requested!r} / {ENV_PROCESS_ID}={index!r} are not integers; valid: "
                        f"{ENV_NUM_PROCESSES}=N (or auto) and {ENV_PROCESS_ID}=0..N-1") from None
    if count < 1 or not 0 <= index < count:
        raise UserError(f"{ENV_NUM_PROCESSES}={count}, {ENV_PROCESS_ID}={index}: valid: N >= 1 and a process id "
                        "in 0..N-1")
    return count, index


def global_batch(mesh: Mesh, local_rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (process i holds rows [i*n, (i+1)*n) of the global batch)."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for name, value in local_rows.items()}


def wait_for_every_process(name: str) -> None:
    """A barrier: returns once every process has reached it (immediately in a 1-process run). Used after process 0
    alone has written a file the others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def place_like(target: Any, source: Any) -> Any:
    """`source`'s values (a pytree of arrays) placed as `target`'s leaves are: each keeps its target's sharding. For
    loading weights into a train state.

    `source` sits on one process-local device (lm_core.trained_runs.load_trained_model, or host arrays); a device_put
    onto a mesh that spans other processes would be a cross-host transfer, so each process places its own shards
    from host memory."""
    if jax.process_count() == 1:
        return jax.tree.map(lambda t, s: jax.device_put(s, t.sharding), target, source)

    def place(t: jax.Array, s: Any) -> jax.Array:
        host = np.asarray(s)
        return jax.make_array_from_callback(t.shape, t.sharding, lambda index: host[index])

    return jax.tree.map(place, target, source)


def answer_of_process_0(answer: bool) -> bool:
    """Process 0's `answer` on every process (each passes its own; a 1-process run gets it back). For decisions
    that lead into collectives, which every process must take alike even when their file systems differ for a
    moment (a directory process 0 is creating)."""
    if jax.process_count() == 1:
        return answer
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(answer)))
