"""MoMa's modality-aware expert-choice FFN against the compute-matched dense SwiGLU: forward + backward time.

    python -m benchmarks.moe [--json] [--variant=moe_4t4i] [--batch=8] [--seq=256] [--repeats=10] [--profile]

Both FFNs have the `bench` model's widths (d=256, d_ff=688, benchmarks/train_step.py) and run on batch·seq tokens,
half text and half image codes, shuffled within each row. MoMa (moma.experts.ModalityAwareMoE, capacity factor 1)
gives each token one full-width expert on average, so its ACTIVE FLOPs per token equal the dense FFN's plus the
routers' (moma.flops). What its static slot arrays EXECUTE is more: with the default max_*_fraction = 1.0 every
group sizes its slots for a batch that is all its modality, so a 50/50 batch computes 2x the expert FLOPs; the
"bounded" setting (max_text_fraction = max_image_fraction = 0.5, right for this mix) computes 1x. Both are timed.

Each FFN's forward + backward (grads of its parameters and its input under a fixed random cotangent) is one jitted
function, compiled and warmed, and the two take turns over `--repeats` calls; the medians' ratio is the result
(target: MoMa <= 1.2x dense). `--profile` also times the pieces of one expert group the same way, to show where
the time goes. Prints ratios, never asserts timings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import ArgumentParser, emit, interleaved_median_seconds, positive_int
from benchmarks.train_step import bench_config
from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.layers import SwiGLU, TokenContext, dense
from moma import experts as moe_lib
from moma.dispatch import combine_slots, gather_slots, swiglu_experts
from moma.flops import executed_expert_overhead, ffn_layer_flops, group_shares
from moma.routing import group_route
from moma.variants import MoMaConfig, parse_variant

Array = jax.Array
SETTINGS = {"default": {}, "bounded": {"max_text_fraction": 0.5, "max_image_fraction": 0.5}}


def half_image_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    """[batch, seq] int32 ids: in every row exactly half are image codes ([vocab/2, vocab)), at random places."""
    rng = np.random.default_rng(seed)
    half = vocab // 2
    is_image = np.stack([rng.permutation(seq) < seq // 2 for _ in range(batch)])
    return np.where(is_image, rng.integers(half, vocab, (batch, seq)), rng.integers(0, half, (batch, seq))
                    ).astype(np.int32)


def forward_backward(apply: Callable[..., Array], differentiable: tuple[Any, ...], other: tuple[Any, ...] = (),
                     seed: int = 1) -> Callable[[], Any]:
    """A zero-argument call running jit(forward + backward) of `apply(*differentiable, *other)`.

    The backward pulls a fixed random cotangent (not ones, which XLA could simplify) back to every
    `differentiable` input. `other` inputs (token ids, indices) are jit ARGUMENTS, not constants folded into the
    program, so routing masks are computed at run time as in training.
    """
    out = jax.eval_shape(apply, *differentiable, *other)
    cotangent = jax.random.normal(jax.random.key(seed), out.shape, out.dtype)

    @jax.jit
    def run(differentiable: tuple[Any, ...], other: tuple[Any, ...], cotangent: Array) -> Any:
        y, pullback = jax.vjp(lambda *d: apply(*d, *other), *differentiable)
        return y, pullback(cotangent)

    return lambda: run(differentiable, other, cotangent)


def ffn_call(module: nnx.Module, x: Array, tokens: Array) -> tuple[Callable[..., Array], tuple[Any, ...]]:
    """(apply(params, x, tokens) -> y, differentiable inputs (params, x)) for an FFN behind lm_core's seam."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def apply(params: nnx.State, x: Array, tokens: Array) -> Array:
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        context = TokenContext(tokens, positions, jnp.ones((batch, seq), jnp.int32))
        return nnx.merge(graphdef, params, rest)(x, context)[0]

    return apply, (params, x)


def active_and_executed_flops(config: ModelConfig, moma: MoMaConfig) -> tuple[float, float]:
    """Forward FLOPs per token of one MoMa FFN layer on a 50/50 batch: allotted by the routing (moma.flops, the
    paper's accounting) and executed by the code. Executed: the experts' slot arrays compute
    moma.flops.executed_expert_overhead x the allotted expert FLOPs, and each router scores EVERY token of the batch
    (not only its modality's), 2·d·|group| per token."""
    shares = group_shares(0.5)
    routed = {name: n for name, n in moma.groups.items() if n > 1}
    active = ffn_layer_flops(config, moma, image_fraction=0.5)
    allotted_routers = sum(shares[name] * 2.0 * config.d_model * n for name, n in routed.items())
    executed_routers = sum(2.0 * config.d_model * n for n in routed.values())
    experts = active - allotted_routers
    return active, experts * executed_expert_overhead(moma, image_fraction=0.5) + executed_routers


def measure(config: ModelConfig, variant: str, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    """Times dense vs MoMa in both slot settings, all interleaved; returns the JSON fields."""
    vocab = config.vocab_size
    tokens = jnp.asarray(half_image_tokens(batch, seq, vocab))
    x = jax.random.normal(jax.random.key(0), (batch, seq, config.d_model), config.compute_dtype)
    runs: dict[str, Callable[[], Any]] = {}
    apply, inputs = ffn_call(SwiGLU(config, rngs=nnx.Rngs(0)), x, tokens)
    runs["dense"] = forward_backward(apply, inputs, (tokens,))
    momas = {name: parse_variant(variant, image_token_range=(vocab // 2, vocab), capacity_factor=1.0, **options)
             for name, options in SETTINGS.items()}
    for name, moma in momas.items():
        apply, inputs = ffn_call(moe_lib.ModalityAwareMoE(config, moma, rngs=nnx.Rngs(0)), x, tokens)
        runs[name] = forward_backward(apply, inputs, (tokens,))
    seconds = interleaved_median_seconds(runs, repeats=repeats)

    dense_flops = 2.0 * 3 * config.d_model * config.d_ff
    result: dict[str, Any] = {"variant": variant, "tokens": batch * seq, "d_model": config.d_model,
                              "d_ff": config.d_ff, "repeats": repeats, "dense_s": seconds["dense"],
                              "dense_flops_per_token": dense_flops}
    for name, moma in momas.items():
        active, executed = active_and_executed_flops(config, moma)
        prefix = "" if name == "default" else f"{name}_"
        result.update({f"{prefix}moe_s": seconds[name], f"{prefix}ratio": seconds[name] / seconds["dense"],
                       f"{prefix}moe_active_flops_per_token": active,
                       f"{prefix}moe_executed_flops_per_token": executed})
    return result


def profile_group(config: ModelConfig, moma: MoMaConfig, batch: int, seq: int, repeats: int) -> dict[str, float]:
    """Forward + backward seconds of each piece of ONE expert group (the text group; the image group is the same
    shape), next to a dense SwiGLU on as many rows as the group's experts compute (experts x slots)."""
    vocab, tokens_n = config.vocab_size, batch * seq
    group = moe_lib.ModalityAwareMoE(config, moma, rngs=nnx.Rngs(0)).groups["text"]
    flat_tokens = jnp.asarray(half_image_tokens(batch, seq, vocab)).reshape(1, -1)  # one routing group
    x = jax.random.normal(jax.random.key(0), (1, tokens_n, config.d_model), config.compute_dtype)
    eligible = ~moe_lib.image_token_mask(flat_tokens, moma.image_token_range)
    routing = group.router(x, eligible)
    graphdef, params, rest = nnx.split(group, nnx.Param, ...)
    _, experts, slots = routing.token_index.shape
    chosen = gather_slots(x, routing.token_index)  # [1, experts, slots, d]
    router = group.router.weight[...]  # [d, experts]

    def scores(router: Array, x: Array) -> Array:
        # Router.scores without noise, on the router kernel alone: differentiating the whole group's state
        # would also time writing zero gradients for every expert weight
        return jax.nn.sigmoid(dense(x, router).astype(jnp.float32))

    def route(s: Array, e: Array) -> Array:
        return group_route(s, e, group.router.capacity, group.router.max_fraction).gate

    def expert_ffns(p: nnx.State, chosen: Array) -> Array:
        return swiglu_experts(chosen, nnx.merge(graphdef, p, rest).weights())

    def scatter(outputs: Array, index: Array) -> Array:
        return combine_slots(x, index, outputs)

    def whole_group(p: nnx.State, x: Array, e: Array) -> Array:
        return nnx.merge(graphdef, p, rest)(x, e)[0]

    dense_apply, dense_inputs = ffn_call(SwiGLU(config, rngs=nnx.Rngs(0)), chosen.reshape(1, -1, config.d_model),
                                         jnp.zeros((1, experts * slots), jnp.int32))
    runs = {
        "router_scores": forward_backward(scores, (router, x)),
        "top_k_route": forward_backward(route, (scores(router, x),), (eligible,)),
        "gather": forward_backward(gather_slots, (x,), (routing.token_index,)),
        "expert_swiglus": forward_backward(expert_ffns, (params, chosen)),
        "scatter_add": forward_backward(scatter, (chosen,), (routing.token_index,)),
        "whole_group": forward_backward(whole_group, (params, x), (eligible,)),
        "dense_same_rows": forward_backward(dense_apply, dense_inputs, (jnp.zeros((1, experts * slots), jnp.int32),)),
    }
    seconds = interleaved_median_seconds(runs, repeats=repeats)
    return {"experts": experts, "slots": slots, **seconds}


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", default="moe_4t4i", help="a MoMa variant name, moe_<m>t<n>i or moe_<n>x")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--profile", action="store_true", help="also time the pieces of one expert group")
    args = parser.parse_args()

    config = bench_config()
    try:
        if parse_variant(args.variant, image_token_range=(config.vocab_size // 2, config.vocab_size)).is_dense:
            raise UserError(f"variant {args.variant!r} has no experts; the dense FFN is the baseline already")
    except UserError as error:
        print(f"--variant: {error}", file=sys.stderr)
        sys.exit(2)
    result = measure(config, args.variant, args.batch, args.seq, args.repeats)
    lines = [
        f"{args.variant} vs dense SwiGLU FFN: d={config.d_model}, d_ff={config.d_ff}, {result['tokens']} tokens "
        f"(half image), forward+backward, median of {args.repeats} interleaved",
        f"{'dense SwiGLU':24s} {result['dense_s'] * 1e3:7.1f} ms   "
        f"{result['dense_flops_per_token'] / 1e6:.3f} MFLOP/token",
    ]
    for name in SETTINGS:
        prefix = "" if name == "default" else f"{name}_"
        label = "max fraction 1.0" if name == "default" else "max fraction 0.5"
        lines.append(
            f"{'MoMa, ' + label:24s} {result[prefix + 'moe_s'] * 1e3:7.1f} ms   "
            f"{result[prefix + 'moe_active_flops_per_token'] / 1e6:.3f} MFLOP/token active, "
            f"{result[prefix + 'moe_executed_flops_per_token'] / 1e6:.3f} executed   "
            f"ratio {result[prefix + 'ratio']:.2f}x (target <= 1.2x)")
    if args.profile:
        for name, options in SETTINGS.items():
            moma = parse_variant(args.variant, image_token_range=(config.vocab_size // 2, config.vocab_size),
                                 capacity_factor=1.0, **options)
            if "text" not in moma.groups:
                lines.append(f"--profile needs a modality-split variant (moe_<m>t<n>i), not {args.variant}")
                break
            pieces = profile_group(config, moma, args.batch, args.seq, args.repeats)
            result[f"profile_{name}"] = pieces
            lines.append(f"text group, {name} slots ({pieces['experts']} experts x {pieces['slots']} slots), "
                         "forward+backward ms:")
            lines += [f"  {piece:16s} {value * 1e3:7.2f}" for piece, value in pieces.items()
                      if piece not in ("experts", "slots")]
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
