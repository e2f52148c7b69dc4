"""Training the VQ image tokenizer without absl flags: shared by train_image_tokenizer and the MoMa training runs."""

from __future__ import annotations

import time


def train_tokenizer(config, source, *, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50):
    """A fresh VQ tokenizer (config: moma.vq.VQConfig) trained on `source`'s train split, with progress lines.

    -> (VQTokenizer, per-step history). Flag-free so the MoMa training entrypoint trains the same tokenizer."""
    from lm_core.data.image_sources import image_batches
    from lm_core.metrics import format_seconds
    from moma.vq import train_vq

    start = time.monotonic()

    def progress(step: int, row: dict[str, float]) -> None:
        if step % log_every and step != steps:
            return
        elapsed = time.monotonic() - start
        print(f"vq step {step}/{steps} | loss {row['loss']:.4f} | mse {row['mse']:.4f} | usage "
              f"{100 * row['usage']:.0f}% | perplexity {row['perplexity']:.1f} | eta "
              f"{format_seconds(elapsed / step * (steps - step))}", flush=True)

    batches = image_batches(source.split("train"), batch_size, seed)
    return train_vq(config, batches, steps, lr, seed, on_step=progress)
