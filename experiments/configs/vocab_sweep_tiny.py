"""Vocabulary scaling sweep at CPU scale (Tao et al. 2024, Approaches 1-3 on our own runs).

Command:
    python -m experiments.vocab_scaling.sweep --config=experiments/configs/vocab_sweep_tiny.py --workdir=runs/vocab
Variants: `vocab_sweep_tiny.py:demo` (2 groups x 3 V x 1 budget, ~2 min, used by `make demo`; its report says
it is too small to show anything).
Measured (2 CPU cores, 27.5 min with other jobs on the machine): 2 model groups (N_nv 60K, 160K) x V in
{384, 640, 1024, 1792} x budgets 3e11 and 3e12 FLOPs, V=640 with a second seed: 20 runs of 89-3,107 steps. Every
IsoFLOP curve has an interior L_u optimum, at V=640 at both budgets in both groups (seed noise 0.023), so the
best V does not move up with compute on the swept grid; between grid points (a quadratic in ln V) it moves
678 -> 785 (d48L2) and 563 -> 805 (d64L3), in the paper's direction but below the x1.5 the report asks for.
Bits per character prefer the largest V everywhere. Approaches 1 and 2 fit, Approach 3 does not (DIR/REPORT.md
says claim by claim). With batch 64 the 3e11 runs had 30-80 steps and their L_u ranked V by step count (V=384
best): an optimiser-starved regime, not a vocabulary effect. Tiny models do not reproduce the paper's constants;
the paper's own coefficients and data do (experiments.vocab_scaling.predict / fit).
"""

import ml_collections

from lm_core.run_config import default_config


def get_config(variant: str = "tiny"):
    config = default_config()
    config.data.seq_len = 128
    # one batch size at every budget, as in the paper, small enough that the 3e11 runs get ~90-300 optimizer
    # steps (with 64 they got 30-80 and L_u ranked V by step count); on 2 cores it is as fast per token as 64
    config.data.global_batch_size = 16
    config.optimizer.learning_rate = 3e-3
    config.log_every = 50
    config.keep_checkpoints = 1
    config.eval_batches = 4  # not used by sweep runs: they score sweep.eval_chars characters at every V
    config.sweep = ml_collections.ConfigDict()
    # One dict per model group; embeddings untied as in the paper's model family. Two small
    # groups whose vocabulary parameters V·d are as large as N_nv over this V range, so V matters; V from just
    # above the byte-fallback minimum (~350 on this corpus), budgets 10x apart (the larger ~900-3,100 steps)
    config.sweep.groups = (
        dict(name="d48L2", d_model=48, num_layers=2, num_heads=4, d_ff=144),
        dict(name="d64L3", d_model=64, num_layers=3, num_heads=4, d_ff=192),
    )
    config.sweep.vocab_sizes = (384, 640, 1024, 1792)
    config.sweep.budgets = (3e11, 3e12)  # FLOPs in the paper's convention, 6 (N_nv + V d) H f(V)
    config.sweep.extra_seeds = (1,)  # repeats of the runs at these V's give the noise bar
    config.sweep.seeded_vocab_sizes = (640,)
    config.sweep.min_steps = 30  # runs whose budget buys fewer steps are left out of the plan
    config.sweep.warmup_fraction = 0.1
    config.sweep.evals_per_run = 4  # evaluation points along each run feed Approach 1's envelope
    # every V is scored on every token of the same whole validation documents, up to this many characters
    # (0 = the whole split; the builtin corpus's is ~196K characters)
    config.sweep.eval_chars = 200_000
    if variant == "demo":
        config.sweep.demo_only = True  # its report says it is too small to show the effect
        config.data.global_batch_size = 16
        config.sweep.groups = (
            dict(name="d64L2", d_model=64, num_layers=2, num_heads=4, d_ff=192),
            dict(name="d96L3", d_model=96, num_layers=3, num_heads=4, d_ff=256),
        )
        config.sweep.vocab_sizes = (512, 1024, 2048)
        config.sweep.seeded_vocab_sizes = ()
        config.sweep.budgets = (2e11,)
        config.sweep.evals_per_run = 2
    elif variant != "tiny":
        raise ValueError(f"unknown variant {variant!r}; valid: tiny, demo")
    return config
