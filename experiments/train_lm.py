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

Pre-tokenised data: `--config.data.source=tokens:DIR` trains on a dataset experiments.prepare_data wrote (no
tokenising at run time). The run's tokenizer is the dataset's (DIR/tokenizer/; on a resume, the workdir's copy, which
must be the one DIR was prepared with), and config.json records its kind in data.tokenizer.

Multi-host: set LM_CORE_COORDINATOR=host:port, LM_CORE_NUM_PROCESSES=N, LM_CORE_PROCESS_ID=i on each process
(every entrypoint joins the job then); SIGTERM to any process saves the same step on all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "lm_tiny.py")


def define_flags() -> None:
    """Defined when run as the entrypoint, not on import: tests import `task_for`, and absl refuses a flag defined
    twice (other entrypoints define --workdir too)."""
    define_config_file("config", DEFAULT_CONFIG, "Training config file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.registry import register_text_sources
    from lm_core.trainer import train

    register_text_sources()

    config, task = task_for(flags.FLAGS.config)
    result = train(config, flags.FLAGS.workdir, task)
    if result.stopped_by_signal:
        sys.exit(143)
    print(f"done: step {result.step}, loss {result.last_metrics.get('loss', float('nan')):.4f}, "
          f"workdir {result.workdir}")


def task_for(config: Any) -> tuple[Any, Any]:
    """(the config to train, the TrainTask or None) for config.data.source: a `tokens:DIR` dataset is read by
    lm_core.data.prepared, every text source by the trainer's default data."""
    from lm_core.data import prepared

    if not prepared.is_prepared_source(config.data.source):
        return config, None
    import jax

    from lm_core.run_data import TrainData
    from lm_core.task import TrainTask

    dataset = prepared.open_prepared(config.data.source)

    def make_data(config: Any, workdir: Path, model_config: Any) -> TrainData:
        return TrainData(*prepared.training_data(dataset, config, workdir, model_config.vocab_size,
                                                 process_index=jax.process_index(), process_count=jax.process_count()))

    return prepared.run_config(config, dataset), TrainTask(make_data=make_data)


if __name__ == "__main__":
    define_flags()
    run(main)
