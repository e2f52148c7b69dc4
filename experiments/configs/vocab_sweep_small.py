"""Vocabulary scaling sweep for one GPU (or a patient CPU): 4 model groups x 6 vocabulary sizes x 4 budgets.

Command:
    python -m experiments.vocab_scaling.sweep --config=experiments/configs/vocab_sweep_small.py --workdir=runs/vs
Expected: ~2-3 GPU-hours; N_nv from ~2M to ~25M, V 1K-32K, budgets 1e14-3e15 FLOPs. Larger models and budgets
than the tiny sweep, so the IsoFLOP optima sit inside the V range and Approach 1-3 fits are better determined.
Use --config.data.source=tfds:<name> for a larger corpus than the built-in one.
"""

from experiments.configs.vocab_sweep_tiny import get_config as tiny_config


def get_config():
    config = tiny_config("tiny")
    config.data.seq_len = 512
    config.data.global_batch_size = 64
    config.model.dtype = "bfloat16"
    config.sweep.groups = (
        dict(name="d256L4", d_model=256, num_layers=4, num_heads=4, d_ff=704),
        dict(name="d384L6", d_model=384, num_layers=6, num_heads=6, d_ff=1024),
        dict(name="d512L8", d_model=512, num_layers=8, num_heads=8, d_ff=1408),
        dict(name="d768L10", d_model=768, num_layers=10, num_heads=12, d_ff=2048),
    )
    config.sweep.vocab_sizes = (1024, 2048, 4096, 8192, 16384, 32768)
    config.sweep.budgets = (1e14, 3e14, 1e15, 3e15)
    config.sweep.min_steps = 100
    return config
