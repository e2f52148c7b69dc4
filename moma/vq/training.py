"""Training the VQ tokenizer: one jitted step does an Adam step on encoder+decoder and an EMA step on the codebook.

`train_vq` builds a fresh tokenizer (inside one jit, with an rbg key: fast to compile on CPU), runs the cached
compiled step per (config, lr) over a stream of image batches, and returns the model with one metrics row per
step; `code_statistics` (codebook usage and perplexity) is shared with evaluation.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm_core.errors import UserError
from moma.vq.model import CodebookState, VQConfig, VQTokenizer, to_signed

Array = jax.Array


StepFn = Callable[[nnx.State, nnx.State, optax.OptState, Array, Array, Array],
                  tuple[nnx.State, nnx.State, optax.OptState, dict[str, Array]]]


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, config: VQConfig) -> StepFn:
    """A jit-compiled `step(params, codebook, opt_state, images, key, restart_all) -> (params, codebook,
    opt_state, metrics)`: one Adam step on encoder+decoder, one EMA step on the codebook."""

    def step(params: nnx.State, codebook: nnx.State, opt_state: optax.OptState, images: Array, key: Array,
             restart_all: Array) -> tuple[nnx.State, nnx.State, optax.OptState, dict[str, Array]]:
        x = to_signed(images, config.image_size)  # [B, H, W, 3]

        def objective(p: nnx.State) -> tuple[Array, tuple[Array, Array, Array, Array]]:
            model = nnx.merge(graphdef, p, codebook)
            z = model.encoder(x)  # [B, h, w, c]
            codes = model.quantizer.nearest(z)  # [B, h, w]
            quantized = model.quantizer.lookup(codes)
            commitment = jnp.mean((z - jax.lax.stop_gradient(quantized)) ** 2)
            reconstruction = model.decoder(z + jax.lax.stop_gradient(quantized - z))  # straight-through
            mse = jnp.mean((reconstruction - x) ** 2)  # [-1, 1] units
            return mse + config.beta * commitment, (z, codes, mse, commitment)

        (loss, (z, codes, mse, commitment)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        model = nnx.merge(graphdef, params, codebook)
        restarted = model.quantizer.ema_update(z, codes, key, restart_all)
        _, _, codebook = nnx.split(model, nnx.Param, CodebookState)
        metrics = {"loss": loss, "mse": mse / 4, "commitment": commitment, "restarted": restarted,
                   **code_statistics(codes, config.codebook_size)}
        return params, codebook, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1, 2))


def _initial_state(config: VQConfig, seed: int) -> tuple[nnx.State, nnx.State]:
    """(params, codebook) of a fresh tokenizer, built inside one jit (compiled once per config) with an rbg key
    (see prng_key): eager construction with threefry keys compiles every initializer separately, ~8 s on CPU."""
    return _build_state(config, prng_key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _build_state(config: VQConfig, key: Array) -> tuple[nnx.State, nnx.State]:
    _, params, codebook = nnx.split(VQTokenizer(config, rngs=nnx.Rngs(params=key)), nnx.Param, CodebookState)
    return params, codebook


def prng_key(seed: int) -> Array:
    """An "rbg" key (XLA's RngBitGenerator): it compiles in a fraction of threefry's time on CPU (seconds per
    model here), and random streams stay deterministic for a given backend, which is all a tokenizer needs."""
    return jax.random.key(seed, impl="rbg")


@functools.lru_cache(maxsize=8)
def _compiled_training(config: VQConfig, lr: float) -> tuple[nnx.GraphDef, optax.GradientTransformation, StepFn]:
    """One jitted step per (config, lr), so training again in the same process (seeds, tests) compiles once."""
    graphdef, _, _ = nnx.split(nnx.eval_shape(lambda: VQTokenizer(config, rngs=nnx.Rngs(0))), nnx.Param,
                               CodebookState)
    optimizer = optax.adam(lr)
    return graphdef, optimizer, make_train_step(graphdef, optimizer, config)


def code_statistics(codes: Array, codebook_size: int) -> dict[str, Array]:
    """Codebook usage (fraction of codes used at least once) and perplexity (exp of the code entropy; K when
    all codes are equally used, 1 when one code takes everything) of a set of codes."""
    counts = jax.ops.segment_sum(jnp.ones(codes.size, jnp.float32), codes.reshape(-1), codebook_size)  # [K]
    p = counts / jnp.sum(counts)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"usage": jnp.mean(counts > 0), "perplexity": jnp.exp(entropy)}


def train_vq(config: VQConfig, images: Iterator[np.ndarray], steps: int, lr: float = 2e-3, seed: int = 0, *,
             on_step: Callable[[int, dict[str, float]], None] | None = None
             ) -> tuple[VQTokenizer, list[dict[str, float]]]:
    """Train a fresh tokenizer for `steps` Adam steps on batches [B, H, W, 3] from `images`.

    Returns the model and one metrics dict per step (loss, mse in [0, 1] units, commitment, usage, perplexity,
    restarted codes, seconds of that step including data). `on_step(step, metrics)` is called after every step
    (progress lines). Same config, data and seed give the same model.
    """
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps={steps!r} is invalid; valid: a positive integer")
    if not lr > 0:
        raise UserError(f"lr={lr} is invalid; valid: a positive learning rate")
    graphdef, optimizer, step_fn = _compiled_training(config, float(lr))
    params, codebook = _initial_state(config, seed)
    opt_state = optimizer.init(params)
    key = prng_key(seed + 1)  # dead-code restarts
    history: list[dict[str, float]] = []
    for step in range(steps):
        start = time.perf_counter()
        batch = next(images, None)
        if batch is None:
            raise UserError(f"the image iterator ended after {step} batches; valid: at least steps={steps} batches")
        params, codebook, opt_state, metrics = step_fn(params, codebook, opt_state, jnp.asarray(batch),
                                                       jax.random.fold_in(key, step), jnp.asarray(step == 0))
        row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        row["seconds"] = time.perf_counter() - start
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"VQ training diverged at step {step + 1} (loss {row['loss']}); lower lr={lr}")
        history.append(row)
        if on_step is not None:
            on_step(step + 1, row)
    return nnx.merge(graphdef, params, codebook), history
