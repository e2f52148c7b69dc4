"""Output-layer loss + gradient for large vocabularies: chunked (lm_core.loss.chunked_cross_entropy) vs naive.

    python -m benchmarks.large_vocab [--vocab=262144] [--d=512] [--tokens=8192] [--chunk=1024] [--json]

Each path runs in its own subprocess so its peak memory is its own (CPU: peak resident memory; GPU/TPU: the
allocator's peak). Reports time and peak memory of both and their ratios (targets: chunked peak <= 25% of naive,
and no slower). The naive path materialises [tokens, vocab] float32 logits and their gradient: 8K x 256K is 8 GiB
each, so on a small machine start with --vocab=65536.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import ArgumentParser, emit, median_seconds, peak_memory_bytes, positive_int


def measure(path: str, vocab: int, d: int, tokens: int, chunk: int, repeats: int) -> dict[str, float]:
    from lm_core.loss import chunked_cross_entropy, cross_entropy

    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (1, tokens, d), jnp.float32)
    weights = jax.random.normal(keys[1], (d, vocab), jnp.float32) * d**-0.5
    targets = jax.random.randint(keys[2], (1, tokens), 0, vocab)
    mask = jnp.ones((1, tokens), jnp.float32)

    if path == "naive":
        def loss(h, w):
            return cross_entropy(jnp.einsum("bsd,dv->bsv", h, w), targets, mask)[0]
    else:
        def loss(h, w):
            return chunked_cross_entropy(h, w, targets, mask, chunk_tokens=chunk)[0]

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    seconds = median_seconds(lambda: grad(hidden, weights), repeats=repeats)
    return {"seconds": seconds, "peak_memory_bytes": peak_memory_bytes()}


def main() -> None:
    parser = ArgumentParser(__doc__)
    parser.add_argument("--vocab", type=positive_int, default=65536)
    parser.add_argument("--d", type=positive_int, default=512)
    parser.add_argument("--tokens", type=positive_int, default=8192)
    parser.add_argument("--chunk", type=positive_int, default=1024)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:  # child process: measure one path, print its JSON
        print(json.dumps(measure(args.only, args.vocab, args.d, args.tokens, args.chunk, args.repeats)))
        return
    results = {}
    for path in ("naive", "chunked"):
        child = subprocess.run([sys.executable, "-m", "benchmarks.large_vocab", f"--only={path}",
                                f"--vocab={args.vocab}", f"--d={args.d}", f"--tokens={args.tokens}",
                                f"--chunk={args.chunk}", f"--repeats={args.repeats}"],
                               capture_output=True, text=True)
        if child.returncode != 0:
            results[path] = {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "failed"}
        else:
            results[path] = json.loads(child.stdout.strip().splitlines()[-1])
    result = {"vocab": args.vocab, "d": args.d, "tokens": args.tokens, "chunk": args.chunk, **{
        f"{path}_{key}": value for path, values in results.items() for key, value in values.items()}}
    if "error" not in results["naive"] and "error" not in results["chunked"]:
        result["memory_ratio"] = results["chunked"]["peak_memory_bytes"] / results["naive"]["peak_memory_bytes"]
        result["time_ratio"] = results["chunked"]["seconds"] / results["naive"]["seconds"]
    lines = [f"output layer loss+grad, V={args.vocab}, d={args.d}, {args.tokens} tokens, chunk {args.chunk}"]
    for path, values in results.items():
        if "error" in values:
            lines.append(f"  {path:8s} failed: {values['error']}")
        else:
            peak_mib = values["peak_memory_bytes"] / 2**20
            lines.append(f"  {path:8s} {values['seconds'] * 1e3:8.1f} ms   peak {peak_mib:8.0f} MiB")
    if "memory_ratio" in result:
        lines.append(f"chunked/naive: memory {result['memory_ratio']:.2f} (target <= 0.25), "
                     f"time {result['time_ratio']:.2f} (target <= 1.0)")
    emit(result, args.json, lines)


if __name__ == "__main__":
    main()
