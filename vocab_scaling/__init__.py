"""Tao et al. 2024, "Scaling Laws with Vocabulary" (arXiv 2407.13623): the formulas, fits and predictor.

The paper in our words, each formula next to the function that implements it: docs/vocab_scaling.md.

One idea per module, each stating the paper's convention it implements:
- `unigram_loss`: the vocabulary-insensitive loss L_u and bits per character;
- `tokenization_curve`: f(V), tokens per character as a quadratic in ln V;
- `flops`: C = 6 (N_nv + V·d) · H · f(V) and the paper's width table d(N_nv);
- `fitting`: one robust (Huber, L-BFGS-B, grid of starts) fitter and the laws it fits;
- `approaches`: Approaches 1-3, `Coefficients` (the published constants) and `predict`;
- `csv_columns`: numeric columns of a CSV of runs, with one-line errors.

Submodules are not imported here: import the one you need (only `unigram_loss` needs jax.numpy itself).
"""
