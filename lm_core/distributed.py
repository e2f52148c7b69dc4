"""Multi-host setup and global batches.

One process per host (or several local processes for testing): `initialize` connects them through
`jax.distributed.initialize`; afterwards `jax.devices()` lists every device of every process and one mesh spans
them all. Each process loads only its own rows of the global batch; `global_batch` stitches them into global arrays.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

from lm_core.sharding import batch_sharding

ENV_COORDINATOR = "LM_CORE_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "LM_CORE_NUM_PROCESSES"
ENV_PROCESS_ID = "LM_CORE_PROCESS_ID"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run if one is configured (arguments or LM_CORE_* variables); returns whether it did.

    On clusters where JAX detects the topology itself (TPU pods, SLURM) pass nothing and set
    LM_CORE_NUM_PROCESSES=auto. CPU processes talk through gloo collectives.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    requested = num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES)
    if requested is None:
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if requested == "auto":
        jax.distributed.initialize()
        return True
    if process_id is None:
        process_id = int(os.environ[ENV_PROCESS_ID])
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(requested),
                               process_id=process_id)
    return True


def global_batch(mesh: Mesh, local_rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (process i holds rows [i*n, (i+1)*n) of the global batch)."""
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for name, value in local_rows.items()}
