"""MoMa (Lin et al. 2024) at the paper's compute-matched sizes, for GPU/TPU meshes. Not runnable on a CPU.

Command (one run per variant and size; share the image tokenizer between them):
    python -m experiments.moma.train --config=experiments/configs/moma_paper.py:90m,moe_4t4i --workdir=runs/p/4t4i \\
        --config.moma.image_tokenizer.dir=runs/p/image_tokenizer --config.moma.image_source=tfds:<captioned images> \\
        --config.mesh.data=-1 --config.mesh.expert=8
    python -m experiments.moma.savings --workdir=runs/p
Argument: `<size>,<variant>` with size 90m | 435m | 1.4b (the paper's dense rows: l=8 d=512, l=24 d=1024,
l=24 d=2048; heads 8/16/16, d_ff = 4d) and variant dense | moe_1t1i | moe_4t4i | moe_8x | mod_moe_4t4i | ...
mod_ variants get the paper's deeper compute-matched dense trunk (90m: 14 layers, 435m: 40; 1.4b: 32 layers at
d=2304, 18 heads, the paper's own choice, which is wider rather than deeper).
Training as in the paper: seq 4096, AdamW (0.9, 0.95), wd 0.1, clip 1.0, peak LR 1e-4 with 4000 warmup steps and a
linear decay to 1e-6, Swin post-norm and z-loss 1e-5 (moma_tiny.paper_recipe; `--config.model.norm_placement=pre`
for pre-norm, `--config.optimizer.decay=cosine` for a cosine decay). Image tokenizer as in Chameleon:
512x512 images -> 32x32 = 1024 codes of a codebook of 8192 (moma.vq trains a small one; train it long, or swap in
a pretrained VQ by writing its codes with CodedPairs). Expect (paper, 1.4B, 1T tokens): η 4t4i 3.7x (text 2.6x,
image 5.2x), 8x 3.0x, mod 4t4i 4.2x; at 90M the paper's savings are smaller. None of this has been run here.
Mesh target: TPU v5p:2x4x4 (32 chips), FSDP over the batch axes (mesh fsdp=-1, data=1; routed variants add
--config.mesh.expert=E and fsdp=32/E, e.g. expert=4 fsdp=8 for moe_4t4i, expert=8 fsdp=4 for moe_8x), 8 rows of
4096 tokens per chip, remat "full", layers scanned (MoD layers scan in pairs), the output layer in chunks of
4096 tokens per chip. Check before launching:
    python -m experiments.compile_check --config=experiments/configs/moma_paper.py:1.4b,moe_4t4i --topology=v5p:2x4x4 \
        --config.mesh.expert=4 --config.mesh.fsdp=8
Routing groups (moma.routing_groups = 0): each chip's experts choose among the 8 x 4096 = 32,768 tokens of its own
batch shard, not among the paper's whole batch (256 x 4096); the chosen slots travel to the chips holding the
experts by all-to-all (moma/dispatch.py). Per-shard expert choice is what expert-choice systems do at scale: the
capacity rule k = c_e · b_M is the same, applied per group, so only the pool each expert ranks is smaller.
`--config.moma.routing_groups=1` restores the whole-batch choice (its dispatch then gathers and reduces the global
batch on every chip: measured at 1.4B moe_4t4i it fits, 36.6 vs 19.5 GiB, but moves ~50x more bytes; README). Expert
slots are sized for all of a group's tokens (max_*_fraction 1.0), so the experts execute 2x the active FLOPs on a
mixed batch; set the bounds from the data's mix to cut that.
MoD picks each row's top 25% (moma/depths.py), so no attention row holds more than 4096 tokens.
"""

from experiments.configs.moma_tiny import moma_section, paper_recipe
from lm_core.run_config import default_config

SIZES = {  # the paper's dense rows: layers, width, heads (d_ff = 4 x width)
    "90m": dict(num_layers=8, d_model=512, num_heads=8),
    "435m": dict(num_layers=24, d_model=1024, num_heads=16),
    "1.4b": dict(num_layers=24, d_model=2048, num_heads=16),
}
MOD_SIZES = {  # the paper's compute-matched MoD rows
    "90m": dict(num_layers=14, d_model=512, num_heads=8),
    "435m": dict(num_layers=40, d_model=1024, num_heads=16),
    "1.4b": dict(num_layers=32, d_model=2304, num_heads=18),
}


def get_config(argument: str = "90m,moe_4t4i"):
    size, _, variant = argument.partition(",")
    if size not in SIZES or not variant:
        raise ValueError(f"config argument {argument!r} is invalid; valid: <size>,<variant> with size in "
                         f"{', '.join(SIZES)}, e.g. 90m,moe_4t4i")
    config = default_config()
    shape = (MOD_SIZES if variant.startswith("mod_") else SIZES)[size]
    config.model.update(dict(vocab_size=65536, max_seq_len=4096, qk_norm=True, num_kv_heads=shape["num_heads"],
                             d_ff=4 * shape["d_model"], dtype="bfloat16", **shape))
    config.data.seq_len = 4096
    config.data.global_batch_size = 256
    config.mesh.update(dict(data=1, fsdp=-1))
    config.model.update(dict(remat="full", scan_layers=True))
    config.loss_chunk_tokens = 4096
    config.optimizer.update(dict(learning_rate=1e-4, warmup_steps=4000, b1=0.9, b2=0.95, weight_decay=0.1,
                                 grad_clip=1.0))
    paper_recipe(config)  # Swin post-norm, z-loss 1e-5, linear decay to 1% of the peak (1e-6)
    config.steps = 100_000
    config.log_every = 50
    config.eval_every = 1000
    config.eval_batches = 16
    config.checkpoint_every = 1000
    config.moma = moma_section(variant)
    config.moma.image_source = "builtin"
    config.moma.image_tokenizer.update(dict(image_size=512, downsample=16, codebook_size=8192, code_dim=256,
                                            widths=(64, 128, 128, 256), steps=20_000, batch_size=64))
    return config
