"""Small shared fixtures-as-functions for the tests."""

from __future__ import annotations

import numpy as np

from lm_core.config import ModelConfig


def tiny_config(**changes) -> ModelConfig:
    """8 query heads over 4 KV heads (GQA), every size divisible by the test meshes' axes."""
    base = dict(vocab_size=128, d_model=64, num_layers=2, num_heads=8, num_kv_heads=4, d_ff=128, max_seq_len=64)
    base.update(changes)
    return ModelConfig(**base)


def random_batch(seed: int, batch: int = 8, seq: int = 16, vocab: int = 128, packed: bool = False
                 ) -> dict[str, np.ndarray]:
    """A next-token batch; with packed=True each row holds two documents (segment ids 1 and 2)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq), np.float32)}
    if packed:
        split = seq // 3
        segments = np.where(np.arange(seq) < split, 1, 2).astype(np.int32)
        out["segment_ids"] = np.broadcast_to(segments, (batch, seq)).copy()
        positions = np.where(np.arange(seq) < split, np.arange(seq), np.arange(seq) - split).astype(np.int32)
        out["positions"] = np.broadcast_to(positions, (batch, seq)).copy()
        out["loss_mask"][:, split - 1] = 0.0  # the last token of document 1 has no target inside its document
    return out
