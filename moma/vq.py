"""A small VQ image tokenizer (Flax NNX): images -> a grid of discrete codes -> images.

Early fusion (Chameleon, MoMa) needs images as token ids: `encode` maps [B, H, W, 3] images to [B, H/f, W/f] codes
in [0, K), which become a reserved id range of the language model's vocabulary (moma.mixed_modal); `decode` maps
codes back to pixels, so a model that generates image tokens can show them.

Architecture: a convolutional encoder (3x3 conv, then per level a residual block and a stride-2 conv: f = 2^levels),
a codebook of K vectors of dimension c, and a mirrored decoder (nearest-neighbour upsampling + conv, which avoids
the checkerboard artefacts of transposed convolutions). GroupNorm + SiLU inside the residual blocks.

Quantisation: nearest code by Euclidean distance; gradients pass the quantiser with the straight-through
estimator (z + sg(z_q - z)); the loss is reconstruction MSE + beta * ||z - sg(z_q)||^2 (commitment, beta = 0.25).
The CODEBOOK IS NOT LEARNED BY GRADIENTS: it follows exponential moving averages of the encoder outputs assigned
to each code (van den Oord et al. 2017, appendix; VQ-VAE-2). EMA was chosen over the codebook loss because it
needs no learning rate of its own and uses far more codes early in training. Dead codes (EMA usage below
`dead_code_threshold` of the average) are restarted at random encoder outputs of the current batch; at step 0
every code is restarted, which is a data-dependent initialisation for free.

Pixel conventions: uint8 images are [0, 255]; float images are [0, 1]; the networks see [-1, 1]. Reported `mse`
is in [0, 1] pixel units (PSNR = -10 log10 mse).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm_core.errors import UserError
from moma.mixed_modal import CodedPairs

Array = jax.Array
CONFIG_FILE = "config.json"
STATE_FILE = "state.npz"


@dataclasses.dataclass(frozen=True)
class VQConfig:
    image_size: int = 32
    downsample: int = 4  # image side / code grid side; a power of two, = 2 ** len(widths)
    codebook_size: int = 256  # K
    code_dim: int = 32  # c
    widths: tuple[int, ...] = (16, 32)  # channels per resolution level, highest first (CPU-sized; GPU: 64, 128)
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.03  # restart codes whose EMA usage is below this fraction of the average

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        problems = []
        levels = math.log2(self.downsample) if self.downsample > 0 else -1
        if self.downsample < 2 or levels != int(levels):
            problems.append(f"downsample={self.downsample} must be a power of two >= 2 (e.g. 4 or 8)")
        elif len(self.widths) != int(levels):
            problems.append(f"widths={self.widths} must have log2(downsample)={int(levels)} entries (one per "
                            "stride-2 level)")
        if any(w < 1 for w in self.widths):
            problems.append(f"widths={self.widths} must be positive")
        if self.downsample >= 2 and (self.image_size < self.downsample or self.image_size % self.downsample):
            problems.append(f"image_size={self.image_size} must be a positive multiple of downsample="
                            f"{self.downsample}")
        if self.codebook_size < 2:
            problems.append(f"codebook_size={self.codebook_size} must be >= 2")
        if self.code_dim < 1:
            problems.append(f"code_dim={self.code_dim} must be >= 1")
        if not self.beta >= 0:
            problems.append(f"beta={self.beta} must be >= 0")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay} must be in [0, 1)")
        if not 0 <= self.dead_code_threshold < 1:
            problems.append(f"dead_code_threshold={self.dead_code_threshold} must be in [0, 1) (0 disables restarts)")
        if problems:
            raise UserError("invalid VQConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        """Codes per image side."""
        return self.image_size // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2


# ---------------------------------------------------------------------------------------------------------------
# Model


class CodebookState(nnx.Variable):
    """Quantiser state updated by moving averages, never by the optimizer (split out with this type)."""


def _group_norm(channels: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nnx.GroupNorm(channels, num_groups=groups, rngs=rngs)


def _conv(in_channels: int, out_channels: int, kernel: int, rngs: nnx.Rngs, stride: int = 1) -> nnx.Conv:
    return nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=(stride, stride), padding="SAME",
                    rngs=rngs)


class ResBlock(nnx.Module):
    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm1 = _group_norm(channels, rngs)
        self.conv1 = _conv(channels, channels, 3, rngs)
        self.norm2 = _group_norm(channels, rngs)
        self.conv2 = _conv(channels, channels, 3, rngs)

    def __call__(self, x: Array) -> Array:  # [B, h, w, channels]
        h = self.conv1(nnx.silu(self.norm1(x)))
        return x + self.conv2(nnx.silu(self.norm2(h)))


class Encoder(nnx.Module):
    def __init__(self, config: VQConfig, *, rngs: nnx.Rngs):
        widths = config.widths
        self.conv_in = _conv(3, widths[0], 3, rngs)
        self.blocks = nnx.List([ResBlock(w, rngs=rngs) for w in widths])
        # Stride-2 4x4 convs: each output pixel sees its whole 2x2 parent patch plus a border.
        self.downs = nnx.List([_conv(w, widths[min(i + 1, len(widths) - 1)], 4, rngs, stride=2)
                               for i, w in enumerate(widths)])
        self.mid = ResBlock(widths[-1], rngs=rngs)
        self.norm_out = _group_norm(widths[-1], rngs)
        self.conv_out = _conv(widths[-1], config.code_dim, 1, rngs)

    def __call__(self, x: Array) -> Array:  # [B, H, W, 3] in [-1, 1] -> [B, h, w, code_dim]
        h = self.conv_in(x)
        for block, down in zip(self.blocks, self.downs, strict=True):
            h = down(block(h))
        return self.conv_out(nnx.silu(self.norm_out(self.mid(h))))


class Decoder(nnx.Module):
    def __init__(self, config: VQConfig, *, rngs: nnx.Rngs):
        widths = config.widths
        self.conv_in = _conv(config.code_dim, widths[-1], 3, rngs)
        self.mid = ResBlock(widths[-1], rngs=rngs)
        # Level i (lowest resolution first): upsample x2, conv to widths[i], residual block.
        levels = list(reversed(range(len(widths))))
        self.ups = nnx.List([_conv(widths[min(i + 1, len(widths) - 1)], widths[i], 3, rngs) for i in levels])
        self.blocks = nnx.List([ResBlock(widths[i], rngs=rngs) for i in levels])
        self.norm_out = _group_norm(widths[0], rngs)
        self.conv_out = _conv(widths[0], 3, 3, rngs)

    def __call__(self, z: Array) -> Array:  # [B, h, w, code_dim] -> [B, H, W, 3] in ~[-1, 1]
        h = self.mid(self.conv_in(z))
        for up, block in zip(self.ups, self.blocks, strict=True):
            h = block(up(_upsample2(h)))
        return self.conv_out(nnx.silu(self.norm_out(h)))


def _upsample2(x: Array) -> Array:  # [B, h, w, C] -> [B, 2h, 2w, C], nearest neighbour
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class VectorQuantizer(nnx.Module):
    """K codes of dimension c, kept as EMA statistics: code_k = embed_sum_k / cluster_size_k."""

    def __init__(self, config: VQConfig, *, rngs: nnx.Rngs):
        self.config = config
        embedding = jax.random.normal(rngs.params(), (config.codebook_size, config.code_dim))  # [K, c]
        self.embedding = CodebookState(embedding)
        self.cluster_size = CodebookState(jnp.ones((config.codebook_size,)))  # [K] EMA of assignments per step
        # [K, c] EMA of the summed encoder outputs assigned to each code (its own buffer: donated separately)
        self.embed_sum = CodebookState(jnp.array(embedding, copy=True))

    def nearest(self, z: Array) -> Array:  # [..., c] -> [...] int32
        codebook = self.embedding.get_value()  # [K, c]
        flat = z.reshape(-1, z.shape[-1])  # [N, c]
        distances = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ codebook.T
                     + jnp.sum(codebook ** 2, -1)[None, :])  # [N, K]
        return jnp.argmin(distances, axis=-1).astype(jnp.int32).reshape(z.shape[:-1])

    def lookup(self, codes: Array) -> Array:  # [...] int -> [..., c]
        return jnp.take(self.embedding.get_value(), codes, axis=0)

    def ema_update(self, z: Array, codes: Array, key: Array, restart_all: Array) -> Array:
        """Move each code toward the mean of its assigned encoder outputs; restart dead codes. Returns how many
        codes were restarted.

        Laplace smoothing of the cluster sizes keeps a code that lost all its inputs from dividing by zero.
        """
        config = self.config
        flat = jax.lax.stop_gradient(z).reshape(-1, config.code_dim)  # [N, c]
        codes = codes.reshape(-1)  # [N]
        num_vectors, num_codes = flat.shape[0], config.codebook_size
        counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, num_codes)  # [K]
        sums = jax.ops.segment_sum(flat, codes, num_codes)  # [K, c]
        decay = config.ema_decay
        cluster_size = decay * self.cluster_size.get_value() + (1 - decay) * counts
        embed_sum = decay * self.embed_sum.get_value() + (1 - decay) * sums
        total = jnp.sum(cluster_size)
        smoothed = (cluster_size + 1e-5) / (total + num_codes * 1e-5) * total  # [K]
        embedding = embed_sum / smoothed[:, None]

        threshold = config.dead_code_threshold * num_vectors / num_codes  # assignments per step
        dead = (cluster_size < threshold) | restart_all  # [K]
        if num_vectors >= num_codes:  # distinct encoder outputs when there are enough
            picks = jax.random.permutation(key, num_vectors)[:num_codes]
        else:
            picks = jax.random.randint(key, (num_codes,), 0, num_vectors)
        fresh = flat[picks]  # [K, c]
        # A restarted code starts AT the threshold: it survives the next step only if it gets at least `threshold`
        # assignments, otherwise it is moved again (an unused code keeps trying new encoder outputs every step).
        self.embedding.set_value(jnp.where(dead[:, None], fresh, embedding))
        self.embed_sum.set_value(jnp.where(dead[:, None], fresh * threshold, embed_sum))
        self.cluster_size.set_value(jnp.where(dead, threshold, cluster_size))
        return jnp.sum(dead)


class VQTokenizer(nnx.Module):
    """encode: images -> codes [B, h, w]; decode: codes -> images in [0, 1]."""

    def __init__(self, config: VQConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.quantizer = VectorQuantizer(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encode(self, images: Array) -> Array:  # [B, H, W, 3] uint8 or float in [0, 1] -> [B, h, w] int32
        return self.quantizer.nearest(self.encoder(to_signed(images, self.config.image_size)))

    def decode(self, codes: Array) -> Array:  # [B, h, w] int -> [B, H, W, 3] float32 in [0, 1]
        return jnp.clip((self.decoder(self.quantizer.lookup(codes)) + 1) / 2, 0, 1)

    def reconstruct(self, images: Array) -> Array:  # [B, H, W, 3] -> [B, H, W, 3] float32 in [0, 1]
        return self.decode(self.encode(images))


def to_signed(images: Array, image_size: int | None = None) -> Array:
    """[B, H, W, 3] uint8 [0, 255] or float [0, 1] -> float32 [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3 or (image_size and images.shape[1:3] != (image_size, image_size)):
        raise UserError(f"images of shape {tuple(images.shape)} are invalid; valid: [batch, {image_size or 'H'}, "
                        f"{image_size or 'W'}, 3]")
    scale = 255.0 if images.dtype == jnp.uint8 else 1.0
    return images.astype(jnp.float32) * (2.0 / scale) - 1.0


# ---------------------------------------------------------------------------------------------------------------
# Training


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


# ---------------------------------------------------------------------------------------------------------------
# Batched, compiled encode / decode for datasets


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, images: Array) -> Array:
    return nnx.merge(graphdef, state).encode(images)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef: nnx.GraphDef, state: nnx.State, codes: Array) -> Array:
    return nnx.merge(graphdef, state).decode(codes)


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(graphdef: nnx.GraphDef, state: nnx.State, images: Array) -> tuple[Array, Array]:
    model = nnx.merge(graphdef, state)
    codes = model.encode(images)
    return codes, model.decode(codes)


def _batched(fn: Callable, model: VQTokenizer, inputs: np.ndarray, batch_size: int) -> Any:
    """fn over `inputs` in chunks of batch_size, the last chunk padded (one compiled shape); outputs (an array or
    a tuple of arrays) are concatenated on the host."""
    if len(inputs) == 0:
        raise UserError("no images to encode or codes to decode; valid: at least one")
    graphdef, state = nnx.split(model)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        result = fn(graphdef, state, jnp.asarray(padded))
        outputs.append(_first_rows(result, len(chunk)))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _first_rows(tree: Any, count: int) -> Any:
    return jax.tree.map(lambda x: np.asarray(x)[:count], tree)


def encode_images(model: VQTokenizer, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[N, H, W, 3] -> [N, h, w] int32 codes, compiled once per batch size."""
    return _batched(_encode, model, np.asarray(images), batch_size)


def decode_codes(model: VQTokenizer, codes: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """[N, h, w] codes -> [N, H, W, 3] uint8 images."""
    images = _batched(_decode, model, np.asarray(codes, np.int32), batch_size)
    return to_uint8(images)


def reconstruct_images(model: VQTokenizer, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """[N, H, W, 3] -> (codes [N, h, w] int32, reconstructions [N, H, W, 3] uint8) in one compiled pass."""
    codes, reconstructions = _batched(_reconstruct, model, np.asarray(images), batch_size)
    return codes, to_uint8(reconstructions)


def encode_pairs(model: VQTokenizer, items: Sequence[Any], batch_size: int = 64) -> CodedPairs:
    """Quantise an image-caption split (ImageCaption-like items) once, for moma.mixed_modal's loader."""
    codes, captions = [], []
    for start in range(0, len(items), batch_size):
        chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
        codes.append(encode_images(model, np.stack([item.image for item in chunk]), batch_size))
        captions += [item.caption for item in chunk]
    grid = model.config.grid_size
    stacked = np.concatenate(codes) if codes else np.zeros((0, grid, grid), np.int32)
    return CodedPairs(captions, stacked, model.config.codebook_size)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255] (rounded)."""
    return np.clip(np.rint(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    mse: float  # [0, 1] pixel units
    psnr: float  # dB
    usage: float  # fraction of the K codes used by these images
    perplexity: float
    num_images: int


def evaluate(model: VQTokenizer, images: np.ndarray, batch_size: int = 64) -> Evaluation:
    """Reconstruction error and codebook statistics over `images` [N, H, W, 3] uint8."""
    codes, reconstructions = _batched(_reconstruct, model, np.asarray(images), batch_size)  # floats in [0, 1]
    mse = float(np.mean((reconstructions - np.asarray(images, np.float32) / 255.0) ** 2))
    stats = code_statistics(jnp.asarray(codes), model.config.codebook_size)
    return Evaluation(mse, -10 * math.log10(max(mse, 1e-12)), float(stats["usage"]), float(stats["perplexity"]),
                      len(images))


# ---------------------------------------------------------------------------------------------------------------
# Save / load: config.json + state.npz ("/"-joined paths of nnx.state -> arrays)


def save_vq(model: VQTokenizer, directory: str | os.PathLike) -> Path:
    """Write the tokenizer to `directory` atomically: a complete new directory replaces any old one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    flat = _flatten(nnx.to_pure_dict(nnx.state(model)))
    staging = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of a killed save by a process with our pid
    staging.mkdir()
    try:
        with open(staging / STATE_FILE, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
        (staging / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.config), indent=2) + "\n")
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            staging.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_config(directory: str | os.PathLike) -> VQConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        return VQConfig(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"VQ tokenizer config '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); "
                        "valid: a directory written by moma.vq.save_vq") from e


def load_vq(directory: str | os.PathLike) -> VQTokenizer:
    """The tokenizer `save_vq` wrote; a missing, corrupt or mismatched state is a UserError naming the file."""
    config = load_config(directory)
    path = Path(directory) / STATE_FILE
    abstract = nnx.eval_shape(lambda: VQTokenizer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = {k: v.shape for k, v in _flatten(nnx.to_pure_dict(state)).items()}
    try:
        with np.load(path) as data:
            saved = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"VQ tokenizer state '{path}' is missing or corrupt ({' '.join(str(e).split())[:160]}); "
                        "valid: a directory written by moma.vq.save_vq") from e
    mismatched = sorted(set(expected) ^ set(saved)) + sorted(
        k for k in set(expected) & set(saved) if saved[k].shape != tuple(expected[k]))
    if mismatched:
        raise UserError(f"VQ tokenizer state '{path}' does not match its config ({len(mismatched)} arrays differ, "
                        f"e.g. {mismatched[:3]}); valid: config.json and state.npz written together by save_vq")
    nnx.replace_by_pure_dict(state, _unflatten({k: jnp.asarray(v) for k, v in saved.items()}))
    return nnx.merge(graphdef, state)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of _flatten; purely numeric keys become ints again (nnx.List indices)."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = (int(p) if p.isdigit() else p for p in name.split("/"))
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def write_reconstruction_grid(path: str | os.PathLike, originals: np.ndarray, reconstructions: np.ndarray, *,
                              columns: int = 8, scale: int = 4) -> Path:
    """A PNG of image pairs: each row of `columns` originals is followed by a row of their reconstructions.

    originals, reconstructions: [N, H, W, 3] uint8. Pixels are enlarged `scale` times (nearest neighbour) so
    32x32 images are inspectable.
    """
    from PIL import Image

    originals, reconstructions = np.asarray(originals, np.uint8), np.asarray(reconstructions, np.uint8)
    if originals.shape != reconstructions.shape or originals.ndim != 4 or len(originals) == 0:
        raise ValueError(f"shapes {originals.shape} and {reconstructions.shape} must be equal [N, H, W, 3], N > 0")
    n, h, w, _ = originals.shape
    rows = -(-n // columns)
    gap = 2
    grid = np.full((rows * 2 * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        x = gap + c * (w + gap)
        for k, images in enumerate((originals, reconstructions)):
            y = gap + (2 * r + k) * (h + gap)
            grid[y:y + h, x:x + w] = images[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)
    return path


def stack_images(items: Sequence[Any], count: int) -> np.ndarray:
    """[min(count, len(items)), H, W, 3] uint8 from the first items of an image split (ImageCaption-like)."""
    return np.stack([items[i].image for i in range(min(count, len(items)))])


__all__ = ["CodebookState", "Evaluation", "VQConfig", "VQTokenizer", "code_statistics", "decode_codes",
           "encode_images", "encode_pairs", "evaluate", "load_config", "load_vq", "make_train_step",
           "reconstruct_images", "save_vq", "stack_images", "to_uint8", "train_vq", "write_reconstruction_grid"]
