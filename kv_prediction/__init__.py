"""KV Prediction for improved time to first token (Horton et al. 2024, arXiv 2410.08391).

A small auxiliary model A reads the prompt; a linear KV predictor P maps A's per-layer K,V to the cache of a
large FROZEN base model B, which then generates. The paper in our words, each part next to its code:
docs/kv_prediction.md. Modules, one idea each:

- `auxiliary`: the aux model (canonical or layer-pruned from the base) and the (base, aux) sanity checks;
- `layer_map`: which aux layer predicts which base layer;
- `predictor`: `KVPredictor`, the per-layer linear K and V maps;
- `model`: `KVPModel` (B + A + P) and its training forward pass;
- `loss`: the 3-term objective `kvp_loss(model, batch, rng)`;
- `optim`: `freeze_base` / `make_kvp_optimizer`, optimizers that only update A and P;
- `serving`: how each model reads a prompt (`PlainPath`, `KVPPath`: the TTFT path, `GivenKVPath`,
  `NullCachePath`) and what every path shares: `generate`, `continuation_nll`, `first_token`;
- `cost`: the TTFT path's analytic FLOPs (`ttft_flops`);
- `baselines`: random token pruning and the true-K,V-from-a-position diagnostic;
- `retrieval` / `knowledge`: the open-book recall and closed-book knowledge tasks, text sources
  `retrieval:<source>` and `knowledge:<source>` (`synthetic`: what the two share);
- `scoring`: exact match and perplexity of what a serving path generates and scores.
"""
