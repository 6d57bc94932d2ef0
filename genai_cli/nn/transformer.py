"""Transformer blocks shared by the causal (pixel transformer) and the bidirectional (masked pixel model,
MaskGIT) families.

``Block`` is a pre-LayerNorm block of multi-head self-attention and an MLP (Vaswani et al. 2017, Sec. 3.2;
Radford et al. 2019, GPT-2, Sec. 2.3). Causal, every key after the query is masked (the "masking out ...
illegal connections" of Sec. 3.2.3) and a ``KVCache`` lets generation run one new position at a time;
bidirectional (``causal=False``), every position sees every other, as in BERT (Devlin et al. 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..hardware import attention
from .autoregressive import causal_mask


class KVCache:
    """Keys and values of the positions computed so far, for one block: one preallocated buffer written in place.

    The layout is position-major and fused, ``qkv`` (T, n, 3d), the rows of the block's fused q|k|v projection as
    they come out of it: storing one new position is a single copy of its (n, 3d) row, never a reallocation or
    a concatenation. Attention reads strided views of it, (n, heads, S, head_dim). The views of each position
    (its query; the keys and values up to it) are made once and kept, so that a decoding step builds none: at
    batch 1 a tiny model's step is a few dozen operations of a few microseconds each, and every view counts.
    ``reset`` empties the cache for a new window and keeps the buffer and its views.
    """

    def __init__(self, n: int, heads: int, max_len: int, d: int, like: Tensor):
        self.n, self.heads, self.d = n, heads, d
        self.qkv = like.new_zeros(max_len, n, 3 * d)  # (T, n, 3d)
        self.length = 0
        self._views: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.params: tuple | None = None  # Block.step's operands, prepared on its first call

    def reset(self) -> None:
        self.length = 0

    def heads_view(self, part: int, start: int, end: int) -> Tensor:
        """q (part 0), k (1) or v (2) of positions start..end-1 as (n, heads, end - start, head_dim), a view."""
        h, d = self.heads, self.d
        return self.qkv[start:end, :, part * d:(part + 1) * d].unflatten(-1, (h, d // h)).permute(1, 2, 0, 3)

    def extend(self, qkv: Tensor) -> tuple[Tensor, Tensor]:
        """Append the fused (n, L, 3d) rows of L new positions; return all keys and values so far, (n, heads, S,
        head_dim) each."""
        end = self.length + qkv.shape[1]
        self.qkv[self.length:end].copy_(qkv.transpose(0, 1))
        self.length = end
        return self.heads_view(1, 0, end), self.heads_view(2, 0, end)

    def position(self, pos: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(slot (n, 3d) of position pos, its query (n, heads, 1, head_dim), keys and values of 0..pos
        (n, heads, pos + 1, head_dim)): views, made on first use, each by one ``as_strided`` on the buffer (one
        operation, where indexing a head-split view parses its index into a slice per dimension: ~3x slower)."""
        views = self._views.get(pos)
        if views is None:
            buf, n, h, d = self.qkv, self.n, self.heads, self.d
            row, hd = buf.stride(0), d // h  # (T, n, 3d) strides: (n * 3d, 3d, 1)
            strides, base = (buf.stride(1), hd, row, 1), buf.storage_offset()
            views = self._views[pos] = (
                buf.select(0, pos),
                buf.as_strided((n, h, 1, hd), strides, base + pos * row),
                buf.as_strided((n, h, pos + 1, hd), strides, base + d),
                buf.as_strided((n, h, pos + 1, hd), strides, base + 2 * d))
        return views


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
        if cache is None:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        b, length, d = x.shape
        qkv = self.qkv(self.ln1(x))  # (B, L, 3d)
        q = qkv[..., :d].unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)  # (B, heads, L, head_dim)
        p = self.dropout if self.training else 0.0
        # Incremental decoding (causal models only): every key and value so far, (n, heads, S, head_dim).
        k_all, v_all = cache.extend(qkv)
        # One new position sees every cached key: no mask needed (and SDPA is faster without one); a prefix into an
        # empty cache (a text's first call, a window's slide) is plain causal attention, with no mask to build.
        if length == 1 or length == k_all.shape[2]:
            y = attention(q, k_all, v_all, is_causal=length > 1, dropout_p=p)
        else:
            y = attention(q, k_all, v_all, attn_mask=causal_mask(length, k_all.shape[2], x.device), dropout_p=p)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(b, length, d)), p, self.training)
        return x + self.mlp(self.ln2(x))

    def attention(self, h: Tensor) -> Tensor:
        """The attention branch on already normalised tokens h (B, L, d) -> (B, L, d), projection and dropout
        included, without the residual: ``forward`` adds it to x, the DiT block (nn/dit.py) gates it first."""
        b, length, d = h.shape
        qkv = self.qkv(h)  # (B, L, 3d)
        q, k, v = (t.unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2) for t in qkv.split(d, dim=-1))
        p = self.dropout if self.training else 0.0
        # softmax(Q K^T / sqrt(d_k)) V with future keys masked, Vaswani et al. Eq. 1; (B, heads, L, head_dim)
        y = attention(q, k, v, is_causal=self.causal, dropout_p=p)
        return F.dropout(self.proj(y.transpose(1, 2).reshape(b, length, d)), p, self.training)

    def step(self, x: Tensor, cache: KVCache, pos: int) -> Tensor:
        """``forward`` of the one position ``pos`` (n, d) -> (n, d), in eval mode, against ``cache`` (which holds
        positions 0..pos-1 and gains pos): the same maths with no module calls, no split / transpose of q, k, v,
        no mask (one query may see every cached key) and no allocation but the results, because at batch 1 the
        cost of a step is its number of operations (see ``KVCache``)."""
        slot, q, k, v = cache.position(pos)
        if cache.params is None:
            cache.params = self.step_params(torch.is_autocast_enabled(x.device.type))
        (shape, eps1, eps2, ln1w, ln1b, wqkv, bqkv, wproj, bproj, ln2w, ln2b, w1, b1, w2, b2, gelu,
         in_place) = cache.params
        # The fused projection writes q|k|v of this position straight into its cache row (n, 3d): addmm's out=
        # in fp32; under autocast (bf16 product, fp32 cache) a copy.
        h = torch.layer_norm(x, shape, ln1w, ln1b, eps1)
        if in_place:
            torch.addmm(bqkv, h, wqkv, out=slot)
        else:
            slot.copy_(torch.addmm(bqkv, h, wqkv))
        cache.length = pos + 1
        # (n, heads, 1, head_dim), contiguous. hardware.attention's check of autocast, decided once: without it
        # (in_place) it is torch's own call.
        y = (F.scaled_dot_product_attention if in_place else attention)(q, k, v)
        x = x + torch.addmm(bproj, y.view(x.shape), wproj)
        h = torch.layer_norm(x, shape, ln2w, ln2b, eps2)
        hidden = F.gelu(torch.addmm(b1, h, w1), approximate=gelu)  # (n, mlp_ratio d)
        return x + torch.addmm(b2, hidden, w2)

    def step_params(self, autocast: bool = False, copies: bool = False) -> tuple:
        """What ``step`` reads, once per stepper: the weights transposed for ``addmm`` (views: a nn.Linear's
        ``F.linear`` transposes its weight on every call), the norms' constants, whether q|k|v is written in
        place. The stepper lives for one draw, so the views always see the current weights. ``copies``: the
        transposed weights as contiguous (in, out) copies instead, which ``addmm`` reads faster over many rows
        (MaskGIT's filling, ``nn/masked.py``, keeps them until a weight changes); at one row the views are faster."""
        ln1, ln2, fc1, fc2 = self.ln1, self.ln2, self.mlp[0], self.mlp[2]

        def t(linear: nn.Linear) -> Tensor:
            return linear.weight.detach().t().contiguous() if copies else linear.weight.t()
        return (ln1.normalized_shape, ln1.eps, ln2.eps, ln1.weight, ln1.bias, t(self.qkv), self.qkv.bias,
                t(self.proj), self.proj.bias, ln2.weight, ln2.bias, t(fc1), fc1.bias, t(fc2), fc2.bias,
                self.mlp[1].approximate, not autocast)
