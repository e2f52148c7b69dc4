"""KV prediction (Horton et al. 2024) at CPU scale: a base LM, auxiliary models, predictors, a Pareto table.

Command:
    python -m experiments.kv_prediction.train --config=experiments/configs/kvp_tiny.py --workdir=runs/kvp
    python -m experiments.kv_prediction.ttft --config=experiments/configs/kvp_tiny.py --prompt_len=256 --json
`model.*` is the BASE model (trained first, then frozen); `kvp.variants` lists the auxiliary models: "lp0.50" /
"lp0.25" (layer-pruned copies of the base keeping that fraction of its layers) and "c<d_model>x<layers>"
(canonical: a smaller model of the same family, e.g. c64x2).
Variants: `kvp_tiny.py:demo` (shorter training, two auxiliary models; used by `make demo`).
Expected (tiny, 2 CPU cores): TTFT FLOPs reductions of ~2x (lp0.50) to ~4-8x (lp0.25, c64x2) at 256-token prompts.
"""

import ml_collections

from lm_core.trainer import default_config


def get_config(variant: str = "tiny"):
    config = default_config()
    config.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                             max_seq_len=320, qk_norm=True))
    config.data.seq_len = 128
    config.data.global_batch_size = 16
    config.steps = 400
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint_every = 200
    config.kvp = ml_collections.ConfigDict(dict(
        variants=("lp0.50", "lp0.25", "c64x2"),
        steps=200,  # auxiliary + predictor training steps (and the aux-only baseline's fine-tuning steps)
        learning_rate=1e-3,
        lambda_base=1.0, lambda_aux=1.0,
        lambda_consistency=0.0,  # 0 = the paper's default 1/n_base_layers
        eval_documents=32,  # held-out validation documents for continuation perplexity
        prompt_tokens=64,  # prompt length of the evaluation (the rest of each window is the continuation)
        continuation_tokens=32,
        ttft_prompt_len=256,
        ttft_batch=1,
        ttft_repeats=20,
    ))
    if variant == "demo":
        config.steps = 120
        config.eval_every = 60
        config.checkpoint_every = 60
        config.kvp.variants = ("lp0.50", "c64x2")
        config.kvp.steps = 60
        config.kvp.eval_documents = 8
    elif variant != "tiny":
        raise ValueError(f"unknown variant {variant!r}; valid: tiny, demo")
    return config
