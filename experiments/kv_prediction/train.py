"""Train the KV-prediction family: the base, then for every auxiliary spec the KVP model and the aux-only baseline.

    python -m experiments.kv_prediction.train --config=experiments/configs/kvp_tiny.py --workdir=DIR \
        [--config.kvp.variants="('lp0.50','c64x2')"] [--config.steps=N] [--config.kvp.steps=N]

Runs, each an lm_core training run with its own checkpoints, metrics.jsonl and TensorBoard events:
- DIR/base: the base LM (`model.*`, `steps`), frozen afterwards; a finished base is loaded, not retrained;
- DIR/pre_c<d>x<l>: a canonical auxiliary pretrained as an LM on the same data (when kvp.pretrain_canonical);
- DIR/kvp_<spec>: auxiliary + KV predictor trained with λ_B·CE(base on predicted KV) + λ_A·CE(aux)
  + λ_C·L1(predicted, true KV), the base frozen (`kvp.steps`);
- DIR/aux_<spec>: the aux-only baseline, the same auxiliary from the same weights fine-tuned as a plain LM for
  the same `kvp.steps`.
The default data is the built-in corpus with the two evaluation tasks mixed in: `knowledge:` (a closed-book fact
table, asked in a new wording at evaluation) and `retrieval:` (facts only in the prompt), see
experiments/configs/kvp_tiny.py. `--config.kvp.lambda_consistency=0` turns the consistency term off (the paper's
ablation; unset = 1/n_base_layers). The base should train at least 3x the KVP steps (the report checks it).
Auxiliary specs: lp<fraction> (layer-pruned base: lp0.75, lp0.50, lp0.25), c<d_model>x<layers> (canonical),
c:<lm_core workdir> (a pretrained model), each optionally with @<layer map> (one aux layer per base layer,
monotone). Rerunning resumes; finished runs are skipped ("run k of n" shows where it is). The config is saved as
DIR/kvp_config.json, so the next steps need only the workdir:
    python -m experiments.kv_prediction.evaluate --workdir=DIR
    python -m experiments.kv_prediction.ttft --workdir=DIR --json
Bad input (a kvp.* field out of range or unknown, see experiments.kv_prediction.task.KVPConfig; an auxiliary not
smaller than the base, a layer map of the wrong length or order, an auxiliary with another vocabulary, a DIR/base
checkpoint of another model) ends with one `error:` line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import define_config_file, run

DEFAULT_CONFIG = str(Path(__file__).parents[1] / "configs" / "kvp_tiny.py")
_CONFIG = define_config_file("config", DEFAULT_CONFIG, "KV prediction config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go.", required=True)


def main(argv: list[str]) -> None:
    del argv
    from experiments.kv_prediction.pipeline import train_all

    train_all(_CONFIG.value, Path(_WORKDIR.value))
    print(f"trained; next: python -m experiments.kv_prediction.evaluate --workdir={_WORKDIR.value}", flush=True)


if __name__ == "__main__":
    run(main)
