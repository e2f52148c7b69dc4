"""MoMa (Lin et al. 2024): modality-aware mixture of experts for early-fusion image+text models."""
