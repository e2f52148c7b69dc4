"""The bench model written plainly in PyTorch eager: what a user would write instead of using lm_core.

Llama-style, like lm_core.model.Transformer with the same `ModelConfig`: token embedding scaled by sqrt(d),
pre-norm blocks (RMSNorm, causal multi-head attention with rotary embeddings, SwiGLU FFN), a final RMSNorm and an
untied output layer; no biases. Only stock PyTorch pieces (nn.Linear, nn.RMSNorm, F.scaled_dot_product_attention
with is_causal=True, torch.optim.AdamW, clip_grad_norm_), written as a PyTorch user would: queries, keys and values
come from one fused nn.Linear (one matmul instead of three). The parameters are lm_core's, the same count; the
point is the baseline one gets without tuning anything. `torch.compile(train_step)` is the compiled baseline
(benchmarks/torch_reference.py). Imported only once torch is known to be installed (torch_reference.py checks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm_core.config import ModelConfig


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [seq, head_dim / 2] each (lm_core's "rotate half" convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; rotates the first half against the second half."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        # rows: queries (heads·hd), keys (kv_heads·hd), values (kv_heads·hd)
        self.widths = [self.heads * hd, self.kv_heads * hd, self.kv_heads * hd]
        self.qkv = nn.Linear(d, sum(self.widths), bias=False)
        self.out = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [batch, seq, h·hd] -> [batch, h, seq, head_dim]
            return t.view(batch, seq, -1, self.head_dim).transpose(1, 2)

        q, k, v = (split_heads(t) for t in self.qkv(x).split(self.widths, dim=-1))
        attended = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v,
                                                  is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.out(attended.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.ffn = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embedding.weight, std=config.d_model**-0.5)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta)
        # buffers, not parameters: they must not enter the parameter count or the optimizer
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] int64 -> logits [batch, seq, vocab] float32."""
        seq = tokens.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embedding(tokens) * self.config.d_model**0.5
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.output(self.final_norm(x))


def make_optimizer(model: nn.Module, lr: float = 3e-3, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW as lm_core.optim configures it (betas 0.9/0.95, decay on matrices only), PyTorch's default kernel."""
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                              {"params": vectors, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor,
               grad_clip: float = 1.0) -> torch.Tensor:
    """One optimizer step on next-token cross-entropy with global-norm clipping; returns the loss."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()
