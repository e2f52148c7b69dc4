"""KV prediction (Horton et al. 2024) at CPU scale: a base LM, auxiliary models, predictors, a Pareto table.

Command:
    python -m experiments.kv_prediction.train --config=experiments/configs/kvp_tiny.py --workdir=runs/kvp
    python -m experiments.kv_prediction.evaluate --workdir=runs/kvp
    python -m experiments.kv_prediction.ttft --config=experiments/configs/kvp_tiny.py --prompt_len=256 --json
`model.*` is the BASE model (trained first, then frozen); `kvp.variants` lists the auxiliary models: "lp0.50" /
"lp0.25" (layer-pruned copies of the base keeping that fraction of its layers) and "c<d_model>x<layers>"
(canonical: a smaller model of the same family, e.g. c64x2, pretrained as an LM first when kvp.pretrain_canonical).
The data is the built-in corpus with synthetic fact-recall documents mixed in ("The pet horse. <corpus text> The
city Oslo. <corpus text> Recall: The city Oslo. Recall: The pet horse."), so accuracy is recalling a value that
is only in the prompt: exactly what a predicted KV cache has to preserve. The base reaches 100% exact match on
held-out documents after 800 steps (41% after 400).
Variants: `kvp_tiny.py:demo` (shorter training, two auxiliary models; used by `make demo`).
Measured (`python -m experiments.reproduce --only=kv_prediction --scale=tiny`, 2 CPU cores, 18 min): base 100%
exact match, perplexity 42.8; lp0.50 and lp0.25: KVP and aux alone 100%, perplexity KVP 42.8 / 42.9 vs aux alone
40.0 / 51.0; c64x2: KVP 11.7% vs aux alone 54.7%, perplexity 43.1 vs 51.5. TTFT FLOPs reductions 1.9x / 3.5x /
6.3x, measured 1.8x / 3.7x / 2.9x at 256-token prompts (the smallest auxiliary is bound by per-call overhead).
"""

import ml_collections

from lm_core.trainer import default_config

# Two facts per document with up to 60 characters of corpus text after each: ~50 tokens, kept whole in a row.
RETRIEVAL_SOURCE = "retrieval:share=0.5,facts=2,filler_chars=60:builtin"


def get_config(variant: str = "tiny"):
    config = default_config()
    config.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                             max_seq_len=320, qk_norm=True))
    config.data.source = RETRIEVAL_SOURCE
    config.data.seq_len = 256
    config.data.global_batch_size = 8
    config.data.whole_documents = True  # a retrieval document split over two rows loses its facts
    config.steps = 800
    config.log_every = 50
    config.eval_every = 400
    config.checkpoint_every = 400
    config.kvp = ml_collections.ConfigDict(dict(
        variants=("lp0.50", "lp0.25", "c64x2"),
        steps=600,  # auxiliary + predictor training steps (and the aux-only baseline's fine-tuning steps)
        learning_rate=1e-3,
        pretrain_canonical=True,  # canonical auxiliaries are first trained as LMs for `steps` (as in the paper)
        lambda_base=1.0, lambda_aux=1.0,
        lambda_consistency=0.0,  # 0 = the paper's default 1/n_base_layers
        eval_questions=128,  # held-out retrieval questions (exact match of greedy answers)
        answer_tokens=8,  # greedy tokens generated per question
        eval_documents=32,  # held-out validation documents for continuation perplexity
        prompt_tokens=64,  # prompt length of the perplexity evaluation (the rest of each window is continuation)
        continuation_tokens=32,
        ttft_prompt_len=256,
        ttft_batch=1,
        ttft_repeats=20,
    ))
    if variant == "demo":
        config.steps = 200
        config.eval_every = 100
        config.checkpoint_every = 100
        config.kvp.variants = ("lp0.50", "c64x2")
        config.kvp.steps = 60
        config.kvp.pretrain_canonical = False  # the demo shows the pipeline, not the accuracy
        config.kvp.ttft_repeats = 5
        config.kvp.eval_questions = 32
        config.kvp.eval_documents = 8
    elif variant != "tiny":
        raise ValueError(f"unknown variant {variant!r}; valid: tiny, demo")
    return config
