"""Vocabulary scaling sweep at CPU scale (Tao et al. 2024, Approaches 1-3 on our own runs).

Command:
    python -m experiments.vocab_scaling.sweep --config=experiments/configs/vocab_sweep_tiny.py --workdir=runs/vocab
Variants: `vocab_sweep_tiny.py:demo` (2 groups x 3 V x 1 budget, ~2 min, used by `make demo`).
Expected (2 CPU cores, ~13 min measured): 3 model groups (N_nv ~0.1M-0.8M) x V in {512 ... 8192} x 3 budgets,
27 runs; the best V by L_u moves up with the budget (512 -> 1024 from 3e11 to 1e12 FLOPs), bits per character
prefer larger V; Approaches 1 and 2 fit, Approach 3 usually does not at this size (all in DIR/REPORT.md).
Tiny models do not reproduce the paper's constants (see the report); the paper's own coefficients do
(python -m experiments.vocab_scaling.predict --nnv=7e9).
"""

import ml_collections

from lm_core.trainer import default_config


def get_config(variant: str = "tiny"):
    config = default_config()
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.optimizer.learning_rate = 3e-3
    config.log_every = 50
    config.keep_checkpoints = 1
    config.eval_batches = 4
    config.sweep = ml_collections.ConfigDict()
    # (name, d_model, num_layers, num_heads, d_ff); embeddings untied as in the paper's model family
    config.sweep.groups = (("d64L2", 64, 2, 4, 192), ("d96L3", 96, 3, 4, 256), ("d128L4", 128, 4, 4, 384))
    config.sweep.vocab_sizes = (512, 1024, 2048, 4096, 8192)
    config.sweep.budgets = (1e11, 3e11, 1e12)  # FLOPs in the paper's convention, 6 (N_nv + V d) H f(V)
    config.sweep.min_steps = 30  # runs whose budget buys fewer steps are left out of the plan
    config.sweep.warmup_fraction = 0.1
    config.sweep.evals_per_run = 4  # evaluation points along each run feed Approach 1's envelope
    if variant == "demo":
        config.sweep.groups = config.sweep.groups[:2]
        config.sweep.vocab_sizes = (512, 1024, 2048)
        config.sweep.budgets = (2e11,)
        config.sweep.evals_per_run = 2
    elif variant != "tiny":
        raise ValueError(f"unknown variant {variant!r}; valid: tiny, demo")
    return config
