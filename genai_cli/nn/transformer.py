"""Transformer blocks shared by the causal (pixel transformer) and the bidirectional (masked pixel model,
MaskGIT) families.

``Block`` is a pre-LayerNorm block of multi-head self-attention and an MLP (Vaswani et al. 2017, Sec. 3.2;
Radford et al. 2019, GPT-2, Sec. 2.3). Causal, every key after the query is masked (the "masking out ...
illegal connections" of Sec. 3.2.3) and a ``KVCache`` lets generation run one new position at a time;
bidirectional (``causal=False``), every position sees every other, as in BERT (Devlin et al. 2019).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .autoregressive import causal_mask


class KVCache:
    """Keys and values of the positions computed so far, one preallocated (n, heads, T, head_dim) pair."""

    def __init__(self, n: int, heads: int, max_len: int, head_dim: int, like: Tensor):
        self.k = like.new_zeros(n, heads, max_len, head_dim)
        self.v = like.new_zeros(n, heads, max_len, head_dim)
        self.length = 0

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append (n, heads, L, head_dim) keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float, causal: bool = True):
        super().__init__()
        self.heads = heads
        self.causal = causal  # False: every position attends to every other (BERT, MaskGIT)
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.reshape(b, length, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        if cache is None:
            # softmax(Q K^T / sqrt(d_k)) V with future keys masked, Vaswani et al. Eq. 1; (B, heads, T, head_dim)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=p)
        else:  # incremental decoding: causal models only
            k_all, v_all = cache.extend(k, v)  # (n, heads, S, head_dim), S = positions so far
            # One new position sees every cached key: no mask needed (and SDPA is faster without one).
            mask = None if length == 1 else causal_mask(length, k_all.shape[2], x.device)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=p)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, length, d)), p, self.training)
        return x + self.mlp(self.ln2(x))
