"""Transformer (``pixel_transformer`` before text arrived): a GPT-style decoder over the raster sequence of
sub-pixel tokens, or over characters.

Position t reads the embedding of token t-1 (a learned start vector at t = 0) plus a learned
positional embedding of t; pre-LayerNorm blocks of causal multi-head self-attention and an MLP
(Vaswani et al. 2017, Sec. 3.2; Radford et al. 2019, GPT-2, Sec. 2.3) give (B, T, K) logits, where
attention masks every key after the query (the "masking out ... illegal connections" of Sec. 3.2.3).

Sampling keeps a key/value cache: the keys and values of positions already computed never change
(they depend on earlier tokens only), so each new token runs the network on one position and attends
over the cache, instead of re-running all t positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn import fused
from ..nn.autoregressive import AR_SAMPLE_OPTIONS, TEXT_OPTIONS, TokenStepper
from ..nn.transformer import Block, KVCache
from ..registry import register_model
from .autoregressive import AutoregressiveImageModel
from .base import GenerativeModel, ImageSpec


@dataclass
class Config:
    levels: int = 0  # K intensity levels per sub-pixel: 2 (Bernoulli), 4, 16, 256; 0: 2 on binary data, else 256
    d_model: int = 64  # width of the residual stream
    heads: int = 4  # attention heads (d_model must be a multiple)
    layers: int = 4  # transformer blocks
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0


@register_model("transformer", "GPT-style causal transformer over pixel or character tokens, with a key/value cache",
                aliases=("pixel_transformer",))
class Transformer(AutoregressiveImageModel, GenerativeModel):
    Config = Config
    tiny = {"d_model": 16, "heads": 2, "layers": 1, "levels": 4}
    modalities = ("image", "tokens")
    sample_options = AR_SAMPLE_OPTIONS | TEXT_OPTIONS

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        d = config.d_model
        if d < 1 or config.heads < 1 or d % config.heads:
            raise GenaiError(f"model.d_model = {d} must be a positive multiple of model.heads = {config.heads}: "
                             "e.g. d_model 64 with heads 4")
        if config.layers < 1 or config.mlp_ratio < 1 or not 0 <= config.dropout < 1:
            raise GenaiError("model.layers and model.mlp_ratio must be >= 1 and model.dropout in [0, 1): "
                             "fix them in the model section")
        self.token_embedding = nn.Embedding(self.levels, d)
        self.start = nn.Parameter(torch.zeros(d))  # the "previous token" of position 0
        self.position_embedding = nn.Parameter(torch.zeros(self.seq_len, d))
        self.blocks = nn.ModuleList(Block(d, config.heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, self.levels)
        for emb in (self.token_embedding.weight, self.position_embedding):
            nn.init.normal_(emb, std=0.02)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.token_embedding(tokens)  # (B, T, d)

    def _run(self, previous: Tensor, start: int, caches: list[KVCache] | None = None) -> Tensor:
        """Positions start .. start+L-1 given their previous tokens' embeddings (B, L, d) -> logits (B, L, K)."""
        x = previous + self.position_embedding[start:start + previous.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.out(self.ln_f(x))

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        # Shift right: position t reads token t-1, and the start vector at t = 0.
        previous = torch.cat([self.start.to(e.dtype).expand(e.shape[0], 1, -1), e[:, :-1]], dim=1)
        return self._run(previous, 0)

    def naive_logits(self, tokens: Tensor, pos: int) -> Tensor:
        # What generation without a cache does: re-run the decoder over tokens 0..pos.
        return self.seq_logits(tokens[:, :pos + 1])[:, pos]

    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> TokenStepper:
        return _Cached(self, n)


class _Cached:
    """Runs only the positions not yet computed against the cache: a whole prefix at once (the first call, and
    after the window slides), then one position per call through ``Block.step``.

    ``restart()`` is the same stepper for a new window: the caches are emptied, their buffers and views kept.
    """

    def __init__(self, model: Transformer, n: int):
        self.model = model
        c = model.config
        like = model.out.weight
        self.caches = [KVCache(n, c.heads, model.seq_len, c.d_model, like) for _ in model.blocks]
        # Row t of the position table, made once: position_embedding[t] would be one more operation per step.
        self.positions = model.position_embedding.unbind(0)  # T views (d,)
        # The head's operands for addmm, once (F.linear would transpose the weight on every step).
        self.head = (model.ln_f.normalized_shape, model.ln_f.weight, model.ln_f.bias, model.ln_f.eps,
                     model.out.weight.t(), model.out.bias)
        self.done = 0
        # For a few texts on a CPU in fp32, one position is one compiled call (nn/fused.py) where a C compiler is at
        # hand; decided on the first one-position call, when autocast is known. False: Block.step, the same maths.
        self.fused = None if n <= fused.MAX_BATCH and fused.enabled() else False

    def restart(self) -> _Cached:
        for cache in self.caches:
            cache.reset()
        self.done = 0
        return self

    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        m = self.model
        if self.done == pos and pos > 0:  # one new position: its previous token is tokens[:, pos - 1]
            if self.fused is None:
                autocast = torch.is_autocast_enabled(tokens.device.type)
                self.fused = (not autocast and fused.fused_step(m, self.caches, self.caches[0].n)) or False
            if self.fused:
                self.done = pos + 1
                return self.fused(tokens, pos)
            x = torch.embedding(m.token_embedding.weight, tokens.select(1, pos - 1)) + self.positions[pos]  # (n, d)
            for block, cache in zip(m.blocks, self.caches):
                x = block.step(x, cache, pos)
            self.done = pos + 1
            shape, ln_w, ln_b, eps, w, b = self.head
            return torch.addmm(b, torch.layer_norm(x, shape, ln_w, ln_b, eps), w)  # (n, K)
        prev = m.token_embedding(tokens[:, max(self.done - 1, 0):pos])  # (n, L or L-1, d)
        if self.done == 0:
            prev = torch.cat([m.start.expand(tokens.shape[0], 1, -1), prev], dim=1)
        logits = m._run(prev, self.done, self.caches)  # (n, L, K)
        self.done = pos + 1
        return logits[:, -1]
