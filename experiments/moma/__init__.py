"""MoMa entrypoints: the VQ image tokenizer (more to come with the mixed-modal trainer)."""
