"""Masked token prediction, shared by the masked pixel model (BERT-style, over pixels) and MaskGIT (over the tokens
of a VQ-VAE): fill in blanks anywhere, predicting each masked token from both sides.

Training (``MaskedTokenModel.loss``) replaces a share of a sequence's N tokens by a mask token whose id, K, is
none of the K token values, and scores the prediction at the masked positions only (the cross-entropy of the
others never enters, so no token value doubles as an "ignore" index). How many are masked:
  uniform: a rate r ~ U(0.15, 0.40), round(r N) tokens (the range BERT-style training uses; Devlin et al. 2019
           mask 15 %, Wettig et al. 2023 find up to 40 % better);
  cosine:  r ~ U(0, 1), ceil(gamma(r) N) tokens, gamma(r) = cos(pi r / 2) (MaskGIT, Chang et al. 2022, sec. 3.2),
           so every rate from all to almost none is trained, as iterative decoding needs;
at least one either way.

Generation (``fill_tokens``) starts from masked positions and, at each of S steps, predicts every masked token, draws
them through ``genai_cli.sampling`` (temperature, top-k, top-p, greedy and noise mean what they mean for the
autoregressive families), and keeps the most confident: after step s, floor(M gamma(s / S)) of the M
initially masked tokens stay masked (MaskGIT Algorithm, sec. 3.2; at least one is fixed per step, none is left at
the end). Confidence is the log-probability of the drawn token plus Gumbel noise scaled by
``choice_temperature`` (1 - s / S), as MaskGIT's reference code anneals it, so early choices are less greedy.
A fixed token never changes again. One step fills everything in one pass: one-shot filling is ``steps=1``.

Likelihood (``absorbing_bound``): masking is the absorbing-state discrete diffusion of Austin et al. (2021); its
continuous-time bound (Sahoo et al. 2024, MDLM eq. 10 with alpha_t = 1 - t) is
    -log p(x) <= E_{t ~ U(0, 1)} (1 / t) E_{z_t} sum_{i masked in z_t} -log p_theta(x_i | z_t),
each token masked with probability t. Drawing the number of masked tokens m ~ U{1..N} instead of t and a uniform
subset of that size gives the same bound with weight N / m = 1 / t (the any-order autoregressive form, Uria et
al. 2014; Hoogeboom et al. 2022, ARDM eq. 4) and no t -> 0 spikes; we estimate it with m stratified.
It is tight only for a model trained across all mask rates (the cosine schedule): a model trained at 15-40 %
is scored at rates it never saw, and its bound is loose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..hardware import attention
from ..sampling import token_sampler
from . import weights_key
from .transformer import Block

MASK_SCHEDULES = ("uniform", "cosine")
UNIFORM_RATES = (0.15, 0.40)
FILLS = ("iterative", "one-shot")
MASKED_SAMPLE_OPTIONS = frozenset({"temperature", "top_k", "top_p", "greedy", "noise_std", "fill", "steps",
                                   "choice_temperature"})
BLANK = "_"  # the placeholder of a character to fill in a masked model's text prompt (--blank changes it)


def gamma(r: float | Tensor) -> float | Tensor:
    """MaskGIT's cosine mask schedule: the share of tokens masked at progress r in [0, 1] (1 at r = 0, 0 at r = 1)."""
    if isinstance(r, Tensor):
        return torch.cos(math.pi / 2 * r)
    return math.cos(math.pi / 2 * r)


def mask_counts(b: int, n: int, schedule: str, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> Tensor:
    """How many of n tokens to mask in each of b sequences, (b,) long in 1..n (see the module doc)."""
    u = torch.rand(b, generator=generator, device=device)
    if schedule == "uniform":
        lo, hi = UNIFORM_RATES
        counts = torch.floor((lo + (hi - lo) * u) * n + 0.5)  # round half up
    elif schedule == "cosine":
        counts = torch.ceil(gamma(u) * n)
    else:
        raise GenaiError(f"unknown model.mask_schedule '{schedule}'; valid: {', '.join(MASK_SCHEDULES)}")
    return counts.long().clamp(1, n)


def random_mask(counts: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Bool (b, n): counts[i] positions of row i, a uniformly random subset."""
    scores = torch.rand(counts.shape[0], n, generator=generator, device=counts.device)
    rank = scores.argsort(1).argsort(1)  # a random permutation of 0..n-1 per row
    return rank < counts[:, None]


def masked_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy (nats) over the masked positions only: logits (B, N, K), targets and mask (B, N)."""
    return F.cross_entropy(logits[mask].float(), targets[mask], label_smoothing=label_smoothing)


class MaskedTransformer(nn.Module):
    """A bidirectional transformer: tokens (B, N) in 0..K (K: the mask token) -> logits (B, N, K) over the K values.

    Learned position embeddings; with ``num_classes`` > 0 a class embedding (row num_classes: "no label", for
    classifier-free guidance) is added to every position.
    """

    def __init__(self, vocab: int, seq_len: int, d_model: int, heads: int, layers: int, mlp_ratio: int,
                 dropout: float, num_classes: int = 0):
        super().__init__()
        if d_model < 1 or heads < 1 or d_model % heads:
            raise GenaiError(f"model.d_model = {d_model} must be a positive multiple of model.heads = {heads}: "
                             "e.g. d_model 64 with heads 4")
        if layers < 1 or mlp_ratio < 1 or not 0 <= dropout < 1:
            raise GenaiError("model.layers and model.mlp_ratio must be >= 1 and model.dropout in [0, 1): "
                             "fix them in the model section")
        self.vocab = vocab
        self.mask_id = vocab  # one id past the values: never a target
        self.token_embedding = nn.Embedding(vocab + 1, d_model)
        self.position_embedding = nn.Parameter(torch.zeros(seq_len, d_model))
        self.class_embedding = nn.Embedding(num_classes + 1, d_model) if num_classes else None
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio, dropout, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab)
        for emb in (self.token_embedding.weight, self.position_embedding):
            nn.init.normal_(emb, std=0.02)
        # (weights' key, lean_weights()) and (key, blank grid's logits per label): not buffers, never in a checkpoint
        self._lean: tuple | None = None
        self._blank: tuple | None = None

    def forward(self, tokens: Tensor, labels: Tensor | None = None, at: Tensor | None = None,
                weights: tuple | None = None) -> Tensor:
        """Logits (B, N, K); with ``at`` (B, N) bool, only those positions' logits, (M, K) in ``logits[at]``'s
        order (a filling step reads the masked positions only). Without autograd, in eval mode: ``lean`` (with
        ``weights`` from ``lean_weights``, if given)."""
        if not self.training and not torch.is_grad_enabled():
            return self.lean(tokens, labels, at, weights)
        x = self.embed(tokens, labels)
        for block in self.blocks:
            x = block(x)
        logits = self.out(self.ln_f(x))  # (B, N, K)
        return logits if at is None else logits[at]

    def embed(self, tokens: Tensor, labels: Tensor | None) -> Tensor:
        x = self.token_embedding(tokens) + self.position_embedding[:tokens.shape[1]]  # (B, N, d); text may be shorter
        if self.class_embedding is not None:
            if labels is None:
                labels = torch.full((tokens.shape[0],), self.class_embedding.num_embeddings - 1, device=tokens.device)
            x = x + self.class_embedding(labels)[:, None]
        return x

    def lean(self, tokens: Tensor, labels: Tensor | None = None, at: Tensor | None = None,
             weights: tuple | None = None) -> Tensor:
        """``forward``'s maths for sampling (eval, no autograd), with the same results in fp32: the blocks as
        functional calls on (B N, d) rows with the weights transposed once (``lean_weights``), no module calls
        and no dropout; with ``at``, the last block's projection and MLP and the head run on those rows only.
        At MaskGIT's batch 1 (49 tokens, width 128) a filling step is ~40 small operations of tens of microseconds
        each, where the module calls and per-call weight transposes of ``forward`` cost about as much again.
        ``weights``: ``lean_weights()`` as a filling loop took it once for its draw (checking them walks every
        parameter: ~85 us, a tenth of a step)."""
        b, n = tokens.shape
        blocks, (lnw, lnb, lne, w_out, b_out) = weights or self.lean_weights()
        if at is not None and n == self.position_embedding.shape[0] and bool(at.all()) \
                and bool((tokens == self.mask_id).all()):
            return self.blank_logits(labels, b)
        x = self.embed(tokens, labels).view(b * n, -1)
        d = x.shape[1]
        for i, (heads, (shape, e1, e2, w1n, b1n, w_qkv, b_qkv, w_proj, b_proj, w2n, b2n, w_fc1, b_fc1, w_fc2, b_fc2,
                        gelu, _)) in enumerate(blocks):
            h = torch.layer_norm(x, shape, w1n, b1n, e1)
            q, k, v = torch.addmm(b_qkv, h, w_qkv).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            y = attention(q, k, v).transpose(1, 2).reshape(b * n, d)  # (B N, d), as Block.attention
            if at is not None and i == len(blocks) - 1:  # keys and values needed every row, the rest only these
                rows = at.view(-1).nonzero().squeeze(1)
                x, y = x.index_select(0, rows), y.index_select(0, rows)
            # Out of place, as forward: under autocast the products are bf16 and the residual stream stays fp32.
            x = x + torch.addmm(b_proj, y, w_proj)
            h = torch.layer_norm(x, shape, w2n, b2n, e2)
            x = x + torch.addmm(b_fc2, F.gelu(torch.addmm(b_fc1, h, w_fc1), approximate=gelu), w_fc2)
        logits = torch.addmm(b_out, torch.layer_norm(x, (d,), lnw, lnb, lne), w_out)
        return logits if at is not None else logits.view(b, n, -1)

    def blank_logits(self, labels: Tensor | None, b: int) -> Tensor:
        """``lean``'s logits (b N, K) of b wholly masked grids: the first filling step of every draw from scratch,
        whose input is the same for every sample of a label. They are computed once for each label row (and the
        unlabelled one) and kept with ``lean_weights``' key and the autocast state, so that step costs a look-up:
        at batch 1 one of MaskGIT's S passes, at batch n the same saving n times over."""
        device = self.position_embedding.device
        key = (self._lean[0], torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        if self._blank is None or self._blank[0] != key:
            rows = 1 if self.class_embedding is None else self.class_embedding.num_embeddings
            blank = torch.full((rows, self.position_embedding.shape[0]), self.mask_id, device=device)
            with torch.inference_mode(False), torch.no_grad():
                every = self.lean(blank, None if rows == 1 else torch.arange(rows, device=device))  # (rows, N, K)
            self._blank = (key, every)
        every = self._blank[1]
        if self.class_embedding is not None:
            none = self.class_embedding.num_embeddings - 1
            every = every[labels] if labels is not None else every[none:].expand(b, -1, -1)
        return every.expand(b, -1, -1).flatten(0, 1)

    def lean_weights(self) -> tuple[list[tuple], tuple]:
        """``lean``'s operands: each block's ``Block.step_params`` with its linear weights as contiguous (in, out)
        copies, which ``addmm`` reads fastest over these 49-row products (a transposed view costs up to 1.6x), and
        the head's. Kept until a weight changes: the key (``nn.weights_key``) is every parameter's storage and
        version counter, which an optimizer step, ``load_state_dict`` or a move bumps."""
        key = weights_key(self.parameters())
        if self._lean is not None and self._lean[0] == key:
            return self._lean[1]
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
            blocks = [(blk.heads, blk.step_params(copies=True)) for blk in self.blocks]
            head = (self.ln_f.weight, self.ln_f.bias, self.ln_f.eps, self.out.weight.detach().t().contiguous(),
                    self.out.bias)
        self._lean = (key, (blocks, head))
        return blocks, head


def fill_tokens(predict: Callable[[Tensor, Tensor], Tensor], tokens: Tensor, mask_id: int, steps: int, *,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                noise_std: float = 0.0, choice_temperature: float = 0.0, generator: torch.Generator | None = None,
                trace: list[Tensor] | None = None) -> Tensor:
    """Fill the positions of ``tokens`` (B, N) equal to ``mask_id`` in ``steps`` steps (see the module doc).

    predict: (tokens (B, N), masked (B, N) bool) -> logits (M, K) at the masked positions, in ``logits[masked]``'s
    order (only those are drawn and scored). ``trace``, when given, receives the (B,) count of masked tokens
    after each step. Returns new tokens; the positions not masked on entry are returned unchanged.
    """
    if steps < 1:
        raise GenaiError(f"--steps must be at least 1, got {steps}")
    tokens = tokens.clone()
    masked = tokens == mask_id
    stays = fill_schedule(masked.sum(1), steps)  # (S, B): masked after each step, worked out once
    draw = token_sampler(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, noise_std=noise_std,
                         generator=generator)  # options checked once for the draw
    for s in range(1, steps + 1):
        if not masked.any():
            break
        logits = predict(tokens, masked)  # (M, K)
        picked = draw(logits)  # (M,)
        score = torch.log_softmax(logits.float(), -1).gather(-1, picked[:, None])[:, 0]  # (M,) log p of the draw
        anneal = choice_temperature * (1 - s / steps)
        if anneal > 0:
            u = torch.rand(score.shape, generator=generator, device=score.device)
            score = score + anneal * -torch.log(-torch.log(u.clamp(1e-20, 1.0)))  # Gumbel noise
        tokens = tokens.masked_scatter(masked, picked)  # drawn everywhere masked; the least confident re-masked below
        # Fixed tokens are never masked again: infinite confidence.
        confidence = torch.full(tokens.shape, math.inf, device=tokens.device).masked_scatter(masked, score)
        rank = confidence.argsort(dim=1, stable=True).argsort(1)  # 0: the least confident
        masked = rank < stays[s - 1, :, None]
        tokens = tokens.masked_fill(masked, mask_id)
        if trace is not None:
            trace.append(masked.sum(1))
    return tokens


def fill_schedule(initial: Tensor, steps: int) -> Tensor:
    """(S, B) long: how many of each row's ``initial`` (B,) masked tokens stay masked after step s = 1..S:
    floor(M gamma(s / S)), at least one fewer than after the step before (while any is left), none at the end."""
    stays, now = [], initial
    for s in range(1, steps):
        stay = torch.floor(initial.double() * gamma(s / steps) + 1e-9).long()
        now = torch.minimum(stay, (now - 1).clamp(min=0))
        stays.append(now)
    return torch.stack([*stays, torch.zeros_like(initial)])


@torch.no_grad()
def absorbing_bound(predict: Callable[[Tensor], Tensor], tokens: Tensor, mask_id: int, strata: int = 8,
                    generator: torch.Generator | None = None) -> Tensor:
    """An unbiased estimate of the upper bound on -log p(tokens) in nats, (B,) (see the module doc).

    The mask sizes m = 1..N are cut into ``strata`` equal strata; one m is drawn in each, one uniformly random
    subset of that size is masked, and (N / m) times the masked tokens' NLL counts for its stratum.
    """
    b, n = tokens.shape
    k = max(1, min(strata, n))
    total = torch.zeros(b, dtype=torch.float64, device=tokens.device)
    for j in range(k):
        lo, hi = 1 + n * j // k, 1 + n * (j + 1) // k  # stratum [lo, hi) of 1..N
        m = torch.randint(lo, hi, (b,), generator=generator, device=tokens.device)
        mask = random_mask(m, n, generator)
        logits = predict(torch.where(mask, mask_id, tokens))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none").view(b, n)
        total += (nll * mask).sum(1).double() * (n / m.double()) * ((hi - lo) / n)
    return total.float()
