"""Upcycling: a trained MoMa 1t1i model becomes an m-t-n-i model whose experts all start as copies.

Every parameter the two models share (embedding, attention, norms, output, MoD routers) is copied. In each expert
group of |group| experts, every expert is the 1t1i model's FFN of that modality with its down projection divided by
|group|, and every router column is the 1t1i gate's column (1t1i stores its FFN as a group of one stacked expert and
its gate as a one-column router, so this is a broadcast along the "expert" axis). The caller turns on router noise
(`router_noise=True` in the target config: moma.routing's Router draws it from the loss's rng), resets the
learning-rate schedule and keeps the data position.

Function at init (no router noise): the copied routers score a token x alike, so every expert gates it by the 1t1i
gate g(x) and a token's FFN output is (n(x) / |group|) · g(x) · FFN(x), n(x) = how many of the group's experts chose
it. Identical scores rank the tokens identically (ties by index), so n(x) is 0 or |group|: every token the experts
choose gets exactly the 1t1i output, the others get no FFN output. The condition for the upcycled model to BE the
1t1i model: every expert keeps every token of its modality, i.e. capacity_factor = |group| (each expert's budget is
all eligible tokens) with no slot overflow (max_*_fraction at least the modality's share of a routing group); the
tests check the logits under it. At the paper's capacity 1 only the top 1/|group| of the tokens by g(x) keep their
FFN at init. With Swin post-norm (the MoMa configs' default) the block normalises the FFN output per token, so while
training with router noise, when the experts choose different tokens, any token chosen by at least one expert still
gets the 1t1i model's output (up to norm_eps), whatever the gates. The router noise is also what makes the copies
diverge: without it, identical experts choosing identical tokens would get identical updates forever.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lm_core.errors import UserError
from lm_core.model import Transformer
from moma.depths import build_moma_model
from moma.variants import MoMaConfig

# parameters of one expert (and its router column, `router/weight`) that every expert of the upcycled group starts from
COPIED_PER_EXPERT = ("gate", "up", "down", "weight")


def check_upcycle(source: MoMaConfig, target: MoMaConfig) -> None:
    """Upcycling goes from moe_1t1i to moe_<m>t<n>i with the same modality split and depth routing."""
    if (source.text_experts, source.image_experts) != (1, 1):
        raise UserError(f"upcycling starts from a moe_1t1i model, not {source.variant!r}")
    if not (target.text_experts and target.image_experts):
        raise UserError(f"upcycling produces a moe_<m>t<n>i model, not {target.variant!r}")
    for field in ("image_token_range", "mod", "mod_capacity"):
        if getattr(source, field) != getattr(target, field):
            raise UserError(f"cannot upcycle {source.variant!r} into {target.variant!r}: {field} differs "
                            f"({getattr(source, field)} vs {getattr(target, field)})")


def upcycle_params(source: nnx.State, target: nnx.State) -> nnx.State:
    """`target`-shaped parameters filled from the 1t1i `source` parameters (works on sharded states too)."""
    source_values = {path: variable.get_value() for path, variable in nnx.to_flat_state(source)}
    used, filled = set(), []
    for path, variable in nnx.to_flat_state(target):
        value, old = variable.get_value(), source_values.get(path)
        if old is not None and old.shape == value.shape:
            new = old
        elif old is not None and path[-1] in COPIED_PER_EXPERT and _one_expert_of(old.shape, value.shape):
            new = _copies(old, value.shape, divide_by_copies=path[-1] == "down")
        else:
            found = "missing" if old is None else f"shaped {old.shape}"
            raise UserError(f"cannot upcycle: target parameter {'/'.join(map(str, path))} {value.shape} is "
                            f"{found} in the source (is the source a 1t1i model of the same size?)")
        used.add(path)
        filled.append((path, variable.replace(new)))
    if leftover := sorted("/".join(map(str, p)) for p in set(source_values) - used):
        raise UserError(f"cannot upcycle: source parameters {leftover[:3]} have no place in the target")
    return nnx.from_flat_state(filled)


def _copies(one: jnp.ndarray, shape: tuple[int, ...], *, divide_by_copies: bool) -> jnp.ndarray:
    """`one` ([.., 1, ..]) broadcast to `shape` ([.., experts, ..]); the down projection divided by the experts, so
    the copies' outputs sum to the 1t1i output when every expert chooses a token (module docstring)."""
    copies = jnp.broadcast_to(one, shape)
    return copies / (copies.size // one.size) if divide_by_copies else copies


def _one_expert_of(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether `source` is `target` with one expert where it has several (the expert axis: first of an expert
    weight, last of a router, behind the layer axis of stacked blocks)."""
    return len(source) == len(target) and sum(s != t for s, t in zip(source, target, strict=True)) == 1 and all(
        s == t or s == 1 for s, t in zip(source, target, strict=True))


def upcycle_model(source_model: Transformer, source: MoMaConfig, target: MoMaConfig, *, rngs: nnx.Rngs
                  ) -> Transformer:
    """A new `target` model holding the upcycled weights of `source_model` (`rngs` only shapes the build: every
    parameter is then taken from the source)."""
    check_upcycle(source, target)
    model = build_moma_model(source_model.config, target, rngs=rngs)
    nnx.update(model, upcycle_params(nnx.state(source_model, nnx.Param), nnx.state(model, nnx.Param)))
    return model
