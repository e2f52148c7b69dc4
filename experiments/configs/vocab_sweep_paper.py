"""The paper's sweep design (Tao et al. 2024) for GPU/TPU meshes: its Llama model family, V list and budgets.

Command (a TPU/GPU pod; shard with the mesh flags, e.g. --config.mesh.fsdp=-1 --config.mesh.data=1):
    python -m experiments.vocab_scaling.sweep --config=experiments/configs/vocab_sweep_paper.py --workdir=DIR \
        --config.data.source=tfds:<a large English corpus>
Expected: the paper's Approach 1-3 constants (within fitting noise) and its table, e.g. V_opt ~ 62K for N_nv = 7B.
Mesh target: TPU v5p:2x4x4 (32 chips), FSDP over all 32, 16 rows of 2048 tokens per chip, remat "full", layers
scanned, the output layer in chunks of 4096 tokens per chip (V up to 96K). Check the largest group before launching:
    python -m experiments.compile_check --config=experiments/configs/vocab_sweep_paper.py --topology=v5p:2x4x4
The budgets here span the paper's range; the full grid is thousands of GPU-days — trim groups/budgets to fit.
"""

from experiments.configs.vocab_sweep_tiny import get_config as tiny_config


def get_config():
    config = tiny_config("tiny")
    config.data.seq_len = 2048
    config.data.global_batch_size = 512
    config.model.update(dict(dtype="bfloat16", remat="full", scan_layers=True))
    config.mesh.update(dict(data=1, fsdp=-1))
    config.loss_chunk_tokens = 4096
    config.optimizer.learning_rate = 4e-4
    config.optimizer.final_lr_fraction = 0.1
    config.log_every = 100
    config.sweep.eval_chars = 10_000_000  # the same validation text at every V
    # the paper's table "Model family used for the sweeps"
    config.sweep.groups = (
        dict(name="33M", d_model=512, num_layers=8, num_heads=8, d_ff=2048),
        dict(name="85M", d_model=768, num_layers=12, num_heads=12, d_ff=2048),
        dict(name="151M", d_model=768, num_layers=16, num_heads=12, d_ff=3072),
        dict(name="302M", d_model=1024, num_layers=18, num_heads=16, d_ff=4096),
        dict(name="631M", d_model=1536, num_layers=20, num_heads=24, d_ff=4800),
        dict(name="1130M", d_model=2048, num_layers=22, num_heads=32, d_ff=5632),
    )
    config.sweep.vocab_sizes = (4096, 6144, 8192, 10240, 16384, 24576, 32768, 48128, 64512, 96256)
    config.sweep.budgets = (2.2e17, 1e18, 5e18, 2e19, 1e20)
    config.sweep.min_steps = 200
    config.sweep.evals_per_run = 20
    return config
