"""Train one MoMa variant (dense, moe_1t1i, moe_4t4i, moe_8x, mod_moe_4t4i, ...) on mixed-modal image-caption data.

    python -m experiments.moma.train --config=experiments/configs/moma_tiny.py:moe_4t4i --workdir=DIR \\
        [--config.moma.image_tokenizer.dir=SHARED_DIR] [--config.<field>=...]

The config has train_lm's fields (`steps`, `mesh.*`, `model.*`, `data.seq_len`, `data.global_batch_size`,
`data.tokenizer`, `optimizer.*`, ...) plus `moma.*` (variant, capacity_factor, image_source, image_tokenizer.*,
upcycle_from, routing_groups; see experiments/configs/moma_tiny.py). Experts are sharded over the mesh axis
`expert` (`--config.mesh.expert=4` needs expert groups divisible by 4); each device routes its own batch shard and
sends the chosen tokens to the experts by all-to-all (`moma.routing_groups` = 0, moma/dispatch.py), and
`--config.moma.routing_groups=K` fixes K groups of rows on any mesh (1: the paper's whole-batch choice).

What it does: trains the VQ image tokenizer first if `moma.image_tokenizer.dir` holds none (the default dir is a
cache keyed by its settings), quantises the image source once (cached next to the tokenizer), trains a text
tokenizer on the captions whose reserved ids hold the image codes and BOI/EOI, and runs lm_core's training loop
with the MoMa model and a loss that logs text and image losses (`text_loss`, `image_loss`, `eval_text_loss`,
`eval_image_loss` in DIR/metrics.jsonl). DIR gets config.json, metrics.jsonl, tensorboard/, tokenizer.model and
checkpoints/; rerunning resumes exactly, SIGTERM/Ctrl-C saves and exits.
`--config.moma.upcycle_from=<a moe_1t1i DIR>` starts an m-t-n-i variant from that run's weights (every expert a copy
of its modality's FFN, every router column a copy of its gate: moma.upcycle; router noise on), with a fresh
learning-rate schedule, continuing that run's data stream where it stopped. The seed's training compute up to the
checkpoint it was upcycled from is recorded in DIR/upcycle_seed.json (`seed_record`), where experiments.moma.savings
starts the upcycled run's compute axis, so its η pays for stage 1 as the paper's does. The seed's state (its latest
step and loss) is saved with the upcycled run's checkpoints (`upcycled_built_on`): once the seed has trained on, a
rerun of the upcycled run is refused in one line naming both states (move the stale run away to redo it).

The run's TrainTask and everything other modules read of a MoMa run live in experiments.moma.task.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "moma_tiny.py")


def define_flags() -> None:
    define_config_file("config", DEFAULT_CONFIG, "MoMa training config file (ml_collections).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.moma.task import moma_task
    from lm_core.run_config import validate_run_config
    from lm_core.trainer import train

    config, workdir = flags.FLAGS.config, Path(flags.FLAGS.workdir)
    validate_run_config(config)  # before the MoMa checks, which would trip over e.g. a batch of 0 rows first
    result = train(config, workdir, moma_task(config, workdir))
    if result.stopped_by_signal:
        sys.exit(143)
    row = result.last_metrics
    print(f"done: {config.moma.variant} step {result.step}, loss {row.get('loss', float('nan')):.4f} (text "
          f"{row.get('text_loss', float('nan')):.4f}, image {row.get('image_loss', float('nan')):.4f}), "
          f"workdir {result.workdir}")


if __name__ == "__main__":
    define_flags()
    run(main)
