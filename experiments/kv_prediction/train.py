"""Train the KV-prediction family: the base, then for every auxiliary spec the KVP model and the aux-only baseline.

    python -m experiments.kv_prediction.train --config=experiments/configs/kvp_tiny.py --workdir=DIR

DIR/base is a plain lm_core run (frozen afterwards); DIR/kvp_<spec> trains auxiliary + predictor with the 3-term
loss λ_B·CE(base on predicted KV) + λ_A·CE(aux) + λ_C·L1(predicted, true KV); DIR/aux_<spec> fine-tunes the same
auxiliary architecture alone for the same steps. Every run resumes; finished runs are skipped.
Then: python -m experiments.kv_prediction.evaluate --config=... --workdir=DIR
"""

from __future__ import annotations

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from experiments.cli import run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "KV prediction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.pipeline import train_all
    from kv_prediction.variants import auxiliary_config
    from lm_core.trainer import model_config_from

    for spec in _CONFIG.value.kvp.variants:  # reject a bad auxiliary spec before training anything
        auxiliary_config(model_config_from(_CONFIG.value), spec)
    train_all(_CONFIG.value, Path(_WORKDIR.value))


if __name__ == "__main__":
    run(main)
