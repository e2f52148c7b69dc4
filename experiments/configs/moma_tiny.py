"""MoMa (Lin et al. 2024) at CPU scale: an early-fusion model on rendered glyph images + captions, one run per variant.

Command (one run per variant; give every run the same moma.image_tokenizer.dir so they share the image codes):
    python -m experiments.moma.train --config=experiments/configs/moma_tiny.py:moe_4t4i --workdir=runs/moma/moe_4t4i \\
        --config.moma.image_tokenizer.dir=runs/moma/image_tokenizer
    python -m experiments.moma.savings --workdir=runs/moma          # eta and throughput vs the dense run
or everything at once: python -m experiments.reproduce --only=moma --scale=tiny.
Variants (the argument after the colon): dense, moe_1t1i, moe_4t4i, moe_8x, mod_moe_4t4i (staged MoD on layers
0, 2, ...; deepened to the compute-matched depth by moma.flops.compute_matched_mod_layers: 2 -> 4 layers here),
demo (moe_4t4i, smaller and shorter: the `make demo` / test size). Any other MoMa name (moe_2t2i, mod_dense, ...)
works too, at the base depth.
Data: builtin glyph images (32x32 -> 8x8 = 64 codes of a 256-code VQ tokenizer, trained first if moma.
image_tokenizer.dir holds none) captioned with what is drawn; half of the pairs image-first, half text-first.
Regime: capacity-bound and single-epoch. A d_model 64, 2-layer model (98,688 non-embedding parameters) reads
8.2M tokens, 96,000 distinct rendered images, none of them twice; eval every 200 steps on 16 held-out batches,
the curves η is read off (experiments.moma.savings).
Measured (`python -m experiments.reproduce --only=moma --scale=tiny`, 2 CPU cores, 30.6 min with the image tokenizer
already trained; a fresh workdir adds ~5 min to train it and quantise the images): final eval loss (text / image)
dense 1.440 (0.627 / 1.704), dense seed 1 1.452 (0.629 / 1.719), moe_1t1i 1.439 (0.617 / 1.706), moe_4t4i 1.469
(0.616 / 1.745), moe_8x 1.538 (0.629 / 1.833), mod_moe_4t4i (4 layers) 1.449 (0.611 / 1.721). η vs dense, noise bar
±0.09 overall / ±0.10 per modality from the second dense seed: only text gains, 1t1i 1.34x, 4t4i 1.23x, MoD 4t4i
1.19x; overall 1t1i 1.00x and no other variant reaches dense's final loss; no variant reaches dense's image loss.
Expert choice at capacity 1 leaves a token without an FFN in a layer when no expert picks it: at the end 19% of
image and 9% of text tokens for 4t4i, 36% of all tokens for 8x (0.67 -> 0.64 routed from start to end: its 8
experts keep picking overlapping tokens). Train step vs dense on this CPU: 1t1i -17%, 4t4i -19%, 8x -13%, MoD
4t4i -35% (the paper's GPU system: -6%, -17%, -9%, -31%). What was tried is in the README's MoMa section.
Training recipe (`paper_recipe`, shared with moma_paper.py), as in the paper (Chameleon's stabilisers): Swin
post-norm, x + norm(f(x)) (`model.norm_placement="swin"`), z-loss 1e-5 (`z_loss`), linear learning-rate decay to 1% of
the peak (`optimizer.decay="linear"`, `optimizer.final_lr_fraction=0.01`). Llama-style pre-norm, x + f(norm(x)),
stays available: `--config.model.norm_placement=pre` (likewise `--config.optimizer.decay=cosine`).
"""

import ml_collections

from experiments.configs import lm_tiny

VARIANTS = ("dense", "moe_1t1i", "moe_4t4i", "moe_8x", "mod_moe_4t4i")


def moma_section(variant: str) -> ml_collections.ConfigDict:
    """The `moma.*` fields experiments.moma.train reads (shared by moma_tiny and moma_paper)."""
    return ml_collections.ConfigDict(dict(
        variant=variant,
        capacity_factor=1.0,  # expert choice: on average this many experts per token
        mod_capacity=0.25,  # c_d of the mixture-of-depths layers
        max_text_fraction=1.0,  # static expert-slot bounds (moma.variants); 1.0 never drops a token
        max_image_fraction=1.0,
        # expert choice ranks each routing group's tokens: 0 = one group per batch shard (the whole batch on one
        # device, as in the paper); a count k splits the batch's rows into k groups on any mesh (moma.variants)
        routing_groups=0,
        image_fraction=0.6,  # share of image-code tokens assumed by the FLOPs accounting (MFU, compute matching)
        image_source="builtin:8000",  # builtin[:<count>] | images:<folder> | tfds:<name>[/<config>] (data.data_dir)
        upcycle_from="",  # a moe_1t1i workdir: start from its weights (router noise on, LR schedule reset)
        image_tokenizer=ml_collections.ConfigDict(dict(
            dir="",  # "" = a cache dir keyed by these settings and the image source (LM_CORE_CACHE)
            image_size=32, downsample=4, codebook_size=256, code_dim=32, widths=(16, 32),
            beta=0.25, ema_decay=0.99, dead_code_threshold=0.03,  # moma.vq.VQConfig's commitment and codebook EMA
            steps=400, batch_size=32, learning_rate=2e-3, seed=0,
        )),
    ))


def get_config(variant: str = "moe_4t4i"):
    config = lm_tiny.get_config("tiny")  # lm_tiny's batch, optimizer and vocabulary; a smaller model
    name = "moe_4t4i" if variant == "demo" else variant
    # Small next to its tokens, and no image seen twice: 4,000 steps of 16 x 128 tokens are 8.2M tokens, ~93K
    # pairs of ~88 tokens (64 image codes + BOI/EOI + a ~22-token caption), out of 96K distinct rendered images.
    config.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=192))
    config.steps = 4000
    config.log_every = 25
    config.eval_every = 200  # η is read off these evaluations (experiments.moma.savings)
    config.eval_batches = 16
    config.checkpoint_every = 500
    config.moma = moma_section(name)
    config.moma.image_source = "builtin:96000"
    paper_recipe(config)
    # Static expert-slot bounds from the built-in data's measured mix (300 batches of 16 x 128 tokens: image codes
    # 74.3-77.0% of a batch, text 23.0-25.7%), with margin. 1.0 would execute every group's experts on all the
    # batch's tokens (2x the active FFN FLOPs); these execute 1.2x. Other data: set them from its mix, or 1.0; a
    # batch beyond a bound is clipped and logged as slot_overflow > 0 in metrics.jsonl.
    config.moma.max_image_fraction = 0.85
    config.moma.max_text_fraction = 0.35
    config.moma.image_fraction = 0.75  # the measured mean, for the FLOPs accounting (MFU; η and depths do not move)
    if variant == "demo":
        config.model.update(dict(vocab_size=512, d_model=64, num_layers=2, d_ff=192))
        config.data.seq_len = 64
        config.data.global_batch_size = 8
        config.steps = 40
        config.log_every = 5
        config.eval_every = 20
        config.eval_batches = 2
        config.checkpoint_every = 20
        config.moma.image_source = "builtin:1000"
        config.moma.image_tokenizer.update(dict(image_size=16, codebook_size=64, code_dim=16, steps=60,
                                                batch_size=16))
        # measured image / text shares of a demo batch: 36-44% / 56-64% (mean 40% image)
        config.moma.update(dict(max_image_fraction=0.55, max_text_fraction=0.75, image_fraction=0.4))
    if name.startswith("mod_"):
        config.model.num_layers = compute_matched_depth(config)
    return config


def paper_recipe(config: ml_collections.ConfigDict) -> None:
    """The paper's (Chameleon's) norm placement, z-loss and learning-rate decay, set in `config` (module docstring)."""
    config.model.norm_placement = "swin"  # "pre" for Llama-style pre-norm
    config.z_loss = 1e-5
    config.optimizer.update(dict(decay="linear", final_lr_fraction=0.01))


def compute_matched_depth(config: ml_collections.ConfigDict) -> int:
    """Layers of a mod_ variant with the forward FLOPs per token of the same variant without MoD at this depth."""
    from lm_core.run_config import model_config_from
    from moma.flops import compute_matched_mod_layers
    from moma.variants import parse_variant

    moma = parse_variant(config.moma.variant, image_token_range=(0, 1), capacity_factor=config.moma.capacity_factor,
                         mod_capacity=config.moma.mod_capacity)
    return compute_matched_mod_layers(model_config_from(config), moma, config.data.seq_len, config.moma.image_fraction)
