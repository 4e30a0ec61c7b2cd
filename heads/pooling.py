"""The trunk every head on pooled tokens shares: pooling, a norm and one hidden layer.

`PooledHead` turns the backbone's output into one vector per object (`pool_tokens`: the
token mean, next to attention-pooled tokens when `pooling="attention"`) and that vector
into hidden features (`features`); a task's head subclasses it and adds its output
layers. Attention pooling follows the "MAP" heads of ViT / SigLIP: a line in one token
of 72 is not averaged away.
"""

from __future__ import annotations

import torch
from torch import nn

from cosmofm.pretrain.modeling_cosmofm import CosmoFMOutput

POOLINGS = ("attention", "mean")


class AttentionPooling(nn.Module):
    """Learned queries attend over the tokens (multi-head attention pooling, as in the
    "MAP" heads of ViT/SigLIP): (N, T, D) tokens + (N, T) validity -> (N, heads * D)."""

    def __init__(self, size: int, n_queries: int):
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.key = nn.Linear(size, n_queries)  # one score per query and token

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        scores = self.key(x).float().masked_fill(~valid.unsqueeze(-1), float("-inf"))  # (N, T, Q)
        weights = scores.softmax(dim=1).to(x.dtype)
        return torch.einsum("ntq,ntd->nqd", weights, x).flatten(1)  # (N, Q * D)


class PooledHead(nn.Module):
    """tokens -> pooled (`pool_tokens`) -> norm -> dropout, linear, GELU, dropout (`features`, (N, hidden_size))."""

    def __init__(self, in_size: int, hidden_size: int, dropout: float, pooling: str = "attention", pooling_heads: int = 4):
        super().__init__()
        self.pool = AttentionPooling(in_size, pooling_heads) if pooling == "attention" else None
        pooled_size = in_size * (1 + pooling_heads) if self.pool is not None else in_size
        self.norm = nn.LayerNorm(pooled_size)
        self.hidden = nn.Sequential(nn.Dropout(dropout), nn.Linear(pooled_size, hidden_size), nn.GELU(), nn.Dropout(dropout))

    def pool_tokens(self, out: CosmoFMOutput) -> torch.Tensor:
        """(N, pooled size): the token mean, next to the attention-pooled tokens."""
        if self.pool is None:
            return out.pooled  # (N, D) mean over tokens
        return torch.cat([out.pooled, self.pool(out.last_hidden_state, out.attention_mask)], dim=-1)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.norm(pooled))  # (N, hidden_size)
