"""Multi-head attention helpers and the one query self-attention block of the DSM decoders.

:class:`QuerySelfAttention` (pre-norm self-attention, then a pre-norm FFN, both residual) updates the organ queries
at the end of every kMMM layer (§4.1.1) and the concatenated organ and tumor queries after Eq. 19 (§4.2.2, "we then
concatenate organ and tumor queries and apply self-attention among them"). Attention runs through
``scaled_dot_product_attention``; no dropout, no positional encoding, so the block is permutation-equivariant over
the queries.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) → (B, H, L, D/H)."""
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def multihead_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention over heads: q (B, Lq, D), k and v (B, Lk, D), optional boolean mask
    broadcastable to (B, H, Lq, Lk) with True = may attend → (B, Lq, D)."""
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=mask)
    b, _, n, dh = out.shape
    return out.transpose(1, 2).reshape(b, n, heads * dh)


class QuerySelfAttention(nn.Module):
    """Self-attention among the queries, then an FFN, both pre-norm residual.

    ``forward(queries (B, N, D)) -> (B, N, D)``; permutation-equivariant over the queries (no
    positional encoding). ``ffn_dim`` defaults to 4·dim.
    """

    def __init__(self, dim: int, num_heads: int = 8, ffn_dim: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.attn_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)  # a key bias cancels in the softmax
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(queries)
        queries = queries + self.out(multihead_attention(self.q(h), self.k(h), self.v(h), self.num_heads))
        return queries + self.ffn(self.ffn_norm(queries))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
