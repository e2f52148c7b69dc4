"""Decode throughput at batch 1 and 8 against the memory-bandwidth bound.

    python -m benchmarks.decode [--json] [--new_tokens=64] [--prompt=128]

Each decode step must read every parameter and the filled part of the KV cache once, so tokens/s can be at most
bandwidth / bytes-per-step (x batch). We measure this machine's copy bandwidth in the same process (an in-place
update of an array as large as the parameters, its reads and writes both counted), timed in alternation with the
decode loop, and report achieved tokens/s as a fraction of that bound (target >= 60% at batch 1).
Models (`--size`): `bench`, the model of benchmarks/train_step.py (4 layers, d=256, V=4096, f32: 21 MiB, which
stays in the CPU's last-level cache, so its bound is the cache's bandwidth and a decode step is dominated by
per-op overhead), and `memory` (8 layers, d=1024, V=32768, f32: ~0.5 GiB, far beyond any cache, the regime real
LLM decoding is in and the bandwidth bound is about). Default: both.

Bytes per step: every weight matrix once, the untied input embedding only for the `batch` rows it looks up (a
gather), and the filled-size cache buffer. A second yardstick separates our loop from XLA:CPU's kernel: the
time of one compiled function that only multiplies a [batch, in] activation by every weight matrix of the model
(matvec ceiling): decode / that is what the surrounding loop (attention, norms, sampling, cache writes) costs.
And a third, what reading alone reaches: one compiled max-reduction over every weight matrix (read stream). On
the 2-core development machine a read-only stream over matrices of a few MiB gets ~60% of the copy bound (a
copy's writes are posted; reads stall on memory latency), so that, not 100%, is the practical ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import ArgumentParser, emit, interleaved_median_seconds, median_seconds, positive_int
from benchmarks.train_step import bench_config
from lm_core.config import ModelConfig
from lm_core.flops import param_counts
from lm_core.generation import SamplingConfig, decode, left_pad, prefill
from lm_core.model import Transformer


def measure_copy_bandwidth(working_set_bytes: int) -> float:
    """Bytes per second read + written by an in-place update of an array as large as the decode working set."""
    run, moved_bytes = copy_run(working_set_bytes)
    return moved_bytes / median_seconds(run, repeats=20, warmup=3)


def copy_run(working_set_bytes: int) -> tuple[Callable[[], jax.Array], int]:
    """(one in-place update of a `working_set_bytes` array, the bytes it reads + writes).

    The same size matters: a 20 MiB model may live in the CPU's last-level cache, and then so does the bound.
    The buffer is donated so each call rewrites the same memory instead of allocating (page faults) anew.
    """
    holder = {"x": jnp.ones((working_set_bytes // 4,), jnp.float32)}
    bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)

    def run() -> jax.Array:
        holder["x"] = bump(holder["x"])
        return holder["x"]

    return run, 2 * holder["x"].nbytes


def decode_run(model: Transformer, batch: int, prompt_len: int, new_tokens: int
               ) -> tuple[Callable[[], jax.Array], int]:
    """(the compiled decode loop over `new_tokens` tokens after a prefilled random prompt, its mean KV-cache bytes
    read per step)."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, model.config.vocab_size, (batch, prompt_len)).tolist()
    tokens, positions, segments = left_pad(prompts)
    config = SamplingConfig(max_new_tokens=new_tokens)
    graphdef, params = nnx.split(model)
    cache_len = prompt_len + new_tokens
    logits, cache = prefill(graphdef, params, tokens, positions, segments, cache_len)
    start_positions = jnp.asarray(positions[:, -1] + 1)
    run = lambda: decode(graphdef, params, logits, cache, start_positions, jax.random.key(0), config)  # noqa: E731
    c = model.config
    # attention reads the whole cache buffer each step (fixed-size, masked): keys + values, all layers
    cache_bytes = 2 * c.num_layers * batch * cache_len * c.num_kv_heads * c.head_dim * 4
    return run, cache_bytes


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--new_tokens", type=positive_int, default=64)
    parser.add_argument("--prompt", type=positive_int, default=128)
    parser.add_argument("--size", choices=["bench", "memory", "both"], default="both")
    args = parser.parse_args()
    sizes = ["bench", "memory"] if args.size == "both" else [args.size]
    result: dict = {}
    lines: list[str] = []
    start = time.perf_counter()
    for size in sizes:
        config = SIZES[size]().replace(max_seq_len=args.prompt + args.new_tokens)
        measured, size_lines = measure(Transformer(config, rngs=nnx.Rngs(0)), args.prompt, args.new_tokens)
        prefix = "" if size == "bench" else f"{size}_"  # the bench model keeps the original, unprefixed keys
        result.update({prefix + key: value for key, value in measured.items()})
        lines += [f"{size} model, " + size_lines[0], *size_lines[1:]]
    result["wall_s"] = time.perf_counter() - start
    emit(result, args.json, lines)


def memory_bound_config() -> ModelConfig:
    return ModelConfig(vocab_size=32768, d_model=1024, num_layers=8, num_heads=8, num_kv_heads=8, d_ff=2816,
                       max_seq_len=256, tie_embeddings=False)


SIZES = {"bench": bench_config, "memory": memory_bound_config}


def measure(model: Transformer, prompt: int, new_tokens: int) -> tuple[dict, list[str]]:
    """Decode tokens/s at batch 1 and 8 next to the bandwidth bound of this model's working set.

    The copy, the read stream, the bare matvecs and the decode loop take turns (each timed call after an untimed
    one of its own kind), so a change of machine load between them cannot pass for a fraction of the bound.
    """
    param_bytes = param_counts(model.config).total * 4
    copy, copy_bytes = copy_run(param_bytes)
    matrices = weight_matrices(model)
    read, read_bytes = read_run(matrices), sum(m.nbytes for m in matrices)
    result: dict = {"param_bytes": param_bytes}
    lines: list[str] = []
    for batch in (1, 8):
        decode_loop, cache_bytes = decode_run(model, batch, prompt, new_tokens)
        seconds = interleaved_median_seconds(
            {"copy": copy, "read": read, "matvec": matvec_run(matrices, batch), "decode": decode_loop},
            repeats=3, settle=1)
        bandwidth, read_bandwidth = copy_bytes / seconds["copy"], read_bytes / seconds["read"]
        if batch == 1:
            result.update(copy_bandwidth_bytes_per_s=bandwidth, read_stream_bytes_per_s=read_bandwidth)
            lines.append(f"{param_bytes / 2**20:.1f} MiB of parameters; copy bandwidth {bandwidth / 1e9:.1f} GB/s; a "
                         f"read-only stream over the weight matrices {read_bandwidth / 1e9:.1f} GB/s "
                         f"({100 * read_bandwidth / bandwidth:.0f}% of copy)")
        tokens_per_s = batch * new_tokens / seconds["decode"]
        step_bytes = touched_param_bytes(model.config, batch) + cache_bytes
        bound = bandwidth / step_bytes * batch
        ceiling = batch / seconds["matvec"]
        result[f"batch{batch}_tokens_per_s"] = tokens_per_s
        result[f"batch{batch}_bytes_per_step"] = step_bytes
        result[f"batch{batch}_bound_tokens_per_s"] = bound
        result[f"batch{batch}_fraction_of_bound"] = tokens_per_s / bound
        result[f"batch{batch}_matvec_ceiling_tokens_per_s"] = ceiling
        lines.append(f"  batch {batch}: {tokens_per_s:,.0f} tokens/s, bandwidth bound {bound:,.0f} tokens/s -> "
                     f"{100 * tokens_per_s / bound:.0f}% of bound" + ("  (target >= 60%)" if batch == 1 else "")
                     + f"; XLA matvecs alone {ceiling:,.0f} tokens/s ({100 * ceiling / bound:.0f}% of bound), "
                     f"decode reaches {100 * tokens_per_s / ceiling:.0f}% of them")
    return result, lines


def touched_param_bytes(config: ModelConfig, batch: int) -> int:
    """f32 bytes of parameters one decode step reads: all but the untied input embedding's unused rows."""
    counts = param_counts(config)
    if config.tie_embeddings:  # the table is read whole by the output layer anyway
        return counts.total * 4
    return (counts.total - counts.embedding + batch * config.d_model) * 4


def weight_matrices(model: Transformer) -> list[jax.Array]:
    """Every weight matrix a decode step multiplies by, flattened to 2-D [in, out]."""
    d_model = model.config.d_model
    matrices = []
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        weight = leaf[...]
        if "embedding" in path:  # the lookup is a gather; tied, the table is the output layer's matrix
            if model.config.tie_embeddings:
                matrices.append(weight.T)
        elif weight.ndim >= 2:  # [d_model, *out] (query, key, value, FFN in) or [*in, d_model]
            matrices.append(weight.reshape(d_model, -1) if weight.shape[0] == d_model
                            else weight.reshape(-1, weight.shape[-1]))
    return matrices


def matvec_run(matrices: list[jax.Array], batch: int) -> Callable[[], list[jax.Array]]:
    """[batch, in] @ W for every matrix (`weight_matrices`), in one jit."""
    inputs = [jnp.ones((batch, m.shape[0]), m.dtype) for m in matrices]
    products = jax.jit(lambda xs, ws: [x @ w for x, w in zip(xs, ws, strict=True)])
    return lambda: products(inputs, matrices)


def read_run(matrices: list[jax.Array]) -> Callable[[], list[jax.Array]]:
    """One max-reduction over every matrix, in one jit (reads only, no arithmetic)."""
    maxima = jax.jit(lambda ws: [jnp.max(w) for w in ws])
    return lambda: maxima(matrices)


if __name__ == "__main__":
    main()
