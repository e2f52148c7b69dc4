"""Entrypoints of the vocabulary-scaling paper: `fit` (scaling-law fits from a CSV) and `predict` (optimal V)."""
