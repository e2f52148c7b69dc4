"""KV prediction entrypoints: train, evaluate, ttft, and the registered reproduction."""
