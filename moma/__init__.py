"""MoMa (Lin et al. 2024): modality-aware mixture of experts for early-fusion image+text models.

The paper in our words, each part next to its code: docs/moma.md.
"""
