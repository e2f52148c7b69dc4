"""Train a language model with lm_core.

    python -m experiments.train_lm --config=experiments/configs/lm_tiny.py --workdir=DIR [--config.<field>=...]

Every ModelConfig field is a flag (`--config.model.num_heads=8`), so is the mesh
(`--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` shards over 8 devices) and the data source
(`--config.data.source=files:/path/*.txt`). Writes DIR/config.json, DIR/metrics.jsonl, DIR/tensorboard/,
DIR/tokenizer.model and DIR/checkpoints/. Rerunning the same command resumes; SIGTERM/Ctrl-C saves and exits.

Weights & Biases: `--config.log.wandb=True` also logs every metrics.jsonl row, at its step, to a W&B run (needs
`pip install wandb`). It is offline by default (no network, no login; files in DIR/wandb/, upload later with
`wandb sync DIR/wandb/offline-run-*`); `--config.log.wandb_mode=online|offline|disabled`,
`--config.log.wandb_project=NAME` (default lm_core), `--config.log.wandb_run_name=NAME` (default: DIR's name). The
run id is kept in DIR/wandb_run_id, so a resumed run continues the same W&B run.
Profiling: `--config.profile_steps=FIRST:LAST` (e.g. 100:103, both inclusive; "" = off) writes a jax.profiler trace
of those steps into DIR/profile/ (read it with `tensorboard --logdir=DIR/profile` and tensorboard-plugin-profile, or
load its .trace.json.gz in Perfetto). A window ending after --config.steps is refused; a run resumed past the window
traces nothing; only process 0 traces. Start the window after the first steps, which are mostly compilation.

Multi-host: set LM_CORE_COORDINATOR=host:port, LM_CORE_NUM_PROCESSES=N, LM_CORE_PROCESS_ID=i on each process
(every entrypoint joins the job then); SIGTERM to any process saves the same step on all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "lm_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "Training config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.registry import register_text_sources
    from lm_core.trainer import train

    register_text_sources()

    result = train(_CONFIG.value, _WORKDIR.value)
    if result.stopped_by_signal:
        sys.exit(143)
    print(f"done: step {result.step}, loss {result.last_metrics.get('loss', float('nan')):.4f}, "
          f"workdir {result.workdir}")


if __name__ == "__main__":
    run(main)
