"""The VQ tokenizer's networks and their config: a convolutional encoder, an EMA codebook, a mirrored decoder.

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
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm_core.errors import UserError

Array = jax.Array


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
