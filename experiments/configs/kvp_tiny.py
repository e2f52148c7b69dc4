"""KV prediction (Horton et al. 2024) at CPU scale: a base LM, auxiliary models, predictors, a Pareto table.

Command:
    python -m experiments.kv_prediction.train --config=experiments/configs/kvp_tiny.py --workdir=runs/kvp
    python -m experiments.kv_prediction.evaluate --workdir=runs/kvp
    python -m experiments.kv_prediction.ttft --config=experiments/configs/kvp_tiny.py --prompt_len=256 --json
`model.*` is the BASE model (trained first, then frozen); `kvp.variants` lists the auxiliary models: "lp0.50" /
"lp0.25" (layer-pruned copies of the base keeping that fraction of its layers) and "c<d_model>x<layers>"
(canonical: a smaller model of the same family, e.g. c64x2, pretrained as an LM first when kvp.pretrain_canonical).
The data is the built-in corpus with two synthetic tasks mixed in (`kv_prediction.knowledge`,
`kv_prediction.retrieval`):
- closed book, the paper's kind of task: a fixed table of 512 invented facts ("The capital of Vicorea is
  Marmoen.") stated across training documents, asked 1-shot in a wording no document uses ("Question: What is
  the capital of Vicorea?\nAnswer:"); the answer is in the weights, which the base has room for and the small
  auxiliaries less so;
- open book: two facts of one category about different people ("Rosa steel. ... Vera silver. ... Recall:
  Rosa"), the answer only in the prompt and only for a cache that knows each token's context.
Fair baselines: the base trains 3x the KVP steps before it is frozen; each aux-only baseline trains the KVP
steps on the same data from the same weights as its KVP model.
Variants: `kvp_tiny.py:demo` (shorter training, one auxiliary model; used by `make demo`).
Measured (`python -m experiments.reproduce --only=kv_prediction --scale=tiny`, 2 CPU cores, 23 min): closed book
base 69.1%; aux alone / KVP: lp0.50@0,1,1,1 52.5 / 69.5%, lp0.25 15.0 / 39.1%, c96x2@0,1,1,1 13.9 / 32.8%,
c64x2@0,1,1,1 5.5 / 7.4% (the paper's KVP >= 1.15x aux alone holds beyond the noise for the first three; c64x2's
1.36x is within it); with the base's own K,V on the asked question every KVP model answers 70-71%. Perplexity aux
alone / KVP 31-43 / 28.1-28.4 (base 28.3). Recall: the base stays at chance (52.5%).
"""

import dataclasses

import ml_collections

from experiments.kv_prediction.task import KVPConfig
from lm_core.run_config import default_config

# The fact table's documents are 35% of the characters, the recall documents (two facts with up to 20 characters
# of corpus text after each: ~30 tokens, kept whole in a row) 32%, the corpus the rest.
TASK_SOURCE = "knowledge:share=0.35,filler_chars=40:retrieval:share=0.5,facts=2,filler_chars=20:builtin"
# The auxiliaries, with layer maps for this 4-layer base where the paper's rule (the first base layers share aux
# layers pairwise: [0,0,1,1]) would hand base layer 1 the K,V of aux layer 0. Those are context-free (a linear
# function of each token's embedding, before any attention or FFN), and base layer 1's K,V are where this base
# reads a recalled fact: with its own K,V on the asked question in layers 0-1 alone, default-map KVP lp0.50 answers
# 68% (all layers: 70%; layers 2-3 alone: 23%). So only base layer 0, whose K,V are context-free too, reads aux
# layer 0. At the paper's depth (28 <- 20) the pairwise rule costs 1 layer in 28; here 1 in 4. lp0.25 has one aux
# layer, so one map. Measured with the default maps: README (KV prediction).
TINY_VARIANTS = ("lp0.50@0,1,1,1", "lp0.25", "c96x2@0,1,1,1", "c64x2@0,1,1,1")


def kvp_section() -> ml_collections.ConfigDict:
    """The `kvp.*` fields: KVPConfig's, with its defaults (each field's meaning is commented there)."""
    values = dataclasses.asdict(KVPConfig())
    # a float placeholder, not None: a field that is None takes no --config.kvp.lambda_consistency=... override
    values["lambda_consistency"] = ml_collections.config_dict.placeholder(float)
    return ml_collections.ConfigDict(values)


def get_config(variant: str = "tiny"):
    config = default_config()
    config.model.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384,
                             max_seq_len=320, qk_norm=True))
    config.data.source = TASK_SOURCE
    config.data.seq_len = 256
    config.data.global_batch_size = 8
    config.data.whole_documents = True  # a retrieval document split over two rows loses its facts
    config.steps = 1500
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 500
    config.kvp = kvp_section()
    config.kvp.variants = TINY_VARIANTS
    # The base's learning rate, not KVPConfig's 1e-3: a canonical auxiliary's predictor starts from random maps,
    # and at 1e-3 its 500 steps leave the predicted cache far from the base's (mean |error| per layer 52-101% of
    # the true K,V's on the closed-book prompts) and KVP below its auxiliary alone (c96x2 8.2 vs 13.3%, c64x2 2.3
    # vs 5.9% on 256 questions); at 3e-3 c96x2 gets 34.4 vs 15.2%, c64x2 7.8 vs 5.5%. Training 1,500 steps at 1e-3
    # works too (41.8 vs 28.9%, 10.9 vs 7.4%), but then the aux-only runs train longer in total than the base.
    # Measured with it: README (KV prediction).
    config.kvp.learning_rate = 3e-3
    if variant == "demo":
        config.steps = 100
        config.eval_every = 100
        config.checkpoint_every = 100
        config.kvp.variants = ("lp0.50",)  # one auxiliary: ~2.8 min on 2 cores, mostly compiling
        config.kvp.steps = 30
        config.kvp.pretrain_canonical = False  # the demo shows the pipeline, not the accuracy
        config.kvp.ttft_repeats = 3
        config.kvp.eval_questions = 16
        config.kvp.demo_only = True  # its report says it is too small to show the effect
        config.kvp.eval_documents = 4
    elif variant != "tiny":
        raise ValueError(f"unknown variant {variant!r}; valid: tiny, demo")
    return config
