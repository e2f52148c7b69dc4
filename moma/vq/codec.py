"""Batched, compiled encode / decode for datasets: host arrays in, host arrays out, one compiled shape per batch size.

Images [N, H, W, 3] -> codes [N, h, w] (`encode_images`), codes -> uint8 images (`decode_codes`), both in one pass
(`reconstruct_images`), and reconstruction error with codebook statistics over a set of images (`evaluate`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm_core.errors import UserError
from moma.vq.model import VQTokenizer
from moma.vq.training import code_statistics

Array = jax.Array


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
