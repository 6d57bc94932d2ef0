"""Vector quantisers: a grid of continuous latents (B, D, h, w) -> a grid of discrete codes (B, h, w).

Two kinds, with one interface (the VQ-VAE picks one by config; a prior over the codes, MaskGIT, reads them):

    forward(z)      training path: (z_q straight-through (B, D, h, w), indices (B, h, w) long, losses dict);
                    in training mode the codebook's EMA, k-means initialisation and dead-code restarts run here
    quantize(z)     pure path, no updates, no gradient to z: (z_q (B, D, h, w), indices (B, h, w))
    codes(indices)  (B, h, w) long -> (B, D, h, w): exactly the z_q that ``quantize`` gives for those indices
    num_codes       how many codes there are

- ``CodebookQuantizer``: nearest neighbour in a learned codebook, straight-through gradient (van den Oord,
  Vinyals & Kavukcuoglu 2017, "Neural Discrete Representation Learning", sec. 3.1-3.2), the codebook learned
  by its loss term or by exponential moving averages (appendix A.1), with two remedies for codebook collapse
  as options: k-means initialisation on the first training batch and restarting dead codes at encoder outputs
  (Dhariwal et al. 2020, Jukebox, sec. 3.3; Zeghidour et al. 2021, SoundStream, sec. 3.3).
- ``FSQ``: finite scalar quantisation (Mentzer, Minnen, Agustsson & Tschannen 2023, "Finite Scalar
  Quantization: VQ-VAE Made Simple", sec. 3): each channel is bounded and rounded to a few fixed levels; the
  codes are the product grid, e.g. [8, 6, 5] -> 240 codes, so there is no codebook to learn or to collapse.

``code_stats`` measures collapse: the share of codes used and the perplexity exp(H) of the code histogram
(K when every code is used equally often, 1 when one code takes everything).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError

LAPLACE_EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes (Sonnet's VectorQuantizerEMA epsilon)
KMEANS_ITERS = 10  # Lloyd iterations of the k-means initialisation
FRESH_SIZE = 1.0  # EMA cluster size (vectors per batch) given to an initial or restarted code
FSQ_EPS = 1e-3  # FSQ's bound stays this fraction inside the outer levels (Mentzer et al. 2023, appendix A)


def histogram_stats(counts: Tensor) -> dict[str, Tensor]:
    """Code histogram (K,) -> {"usage": share of the K codes used at least once, "perplexity": exp(H(p))}."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1)
    entropy = -torch.special.xlogy(p, p).sum()  # nats; 0 log 0 = 0
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


def code_stats(indices: Tensor, num_codes: int) -> dict[str, Tensor]:
    """Indices (any shape, long) -> ``histogram_stats`` of their histogram over num_codes codes."""
    return histogram_stats(torch.bincount(indices.flatten(), minlength=num_codes))


def _to_rows(z: Tensor) -> Tensor:
    """(B, D, h, w) -> (B * h * w, D) float32: distances and roundings in fp32 even under autocast."""
    return z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _to_grid(rows: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """(B * h * w, D) -> (B, D, h, w) for a grid shape (B, h, w)."""
    b, h, w = shape
    return rows.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


class CodebookQuantizer(nn.Module):
    """Nearest-neighbour quantisation in a codebook e (K, D) (van den Oord et al. 2017).

    ``ema``: the codebook is a buffer moved by exponential moving averages of its assigned encoder outputs
    (appendix A.1) instead of a parameter trained by the codebook loss. ``kmeans_init``: on the first training
    batch the codebook is set by k-means on the encoder outputs. ``restart_dead``: a code whose EMA count of
    assigned vectors per batch falls below ``dead_code_threshold`` is reset to a random encoder output of the
    current batch. The draws of both take a generator seeded from a buffer (drawn with the weights) and the
    number of training batches seen, so a resumed run draws what an uninterrupted one would have.
    """

    def __init__(self, num_codes: int, dim: int, *, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 kmeans_init: bool = True, restart_dead: bool = True, dead_code_threshold: float = 0.5):
        super().__init__()
        if num_codes < 2 or dim < 1:
            raise GenaiError(f"a codebook needs at least 2 codes of dimension >= 1, got {num_codes} x {dim}; "
                             "use e.g. model.codebook_size: 256")
        if not 0 < decay < 1:
            raise GenaiError(f"model.ema_decay must be in (0, 1), got {decay}; use e.g. 0.99")
        if not math.isfinite(beta) or beta < 0:
            raise GenaiError(f"model.beta must be a finite number >= 0, got {beta}; the paper uses 0.25")
        if restart_dead and not 0 < dead_code_threshold < FRESH_SIZE:
            raise GenaiError(f"dead_code_threshold must be in (0, {FRESH_SIZE}) vectors per batch, got "
                             f"{dead_code_threshold}; use e.g. 0.5")
        self._num_codes, self.dim = num_codes, dim
        self.beta, self.ema, self.decay = beta, ema, decay
        self.restart_dead, self.dead_code_threshold = restart_dead, dead_code_threshold
        # A small uniform initialisation, as the reference implementations; k-means replaces it when enabled.
        embed = torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes)  # (K, D)
        if ema:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_sum", embed * FRESH_SIZE)  # m_i of appendix A.1, (K, D)
        else:
            self.embed = nn.Parameter(embed)
        # N_i of appendix A.1: EMA of each code's count of assigned vectors per batch (K,). Without EMA codebook
        # updates it is kept all the same: the dead-code restart reads it.
        self.register_buffer("cluster_size", torch.full((num_codes,), FRESH_SIZE))
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self.register_buffer("seed", torch.randint(0, 2**31, ()))  # drawn from torch's RNG, as the weights are
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))  # training batches seen

    @property
    def num_codes(self) -> int:
        return self._num_codes

    # -- the pure path ------------------------------------------------------------------------
    @staticmethod
    def _nearest(rows: Tensor, embed: Tensor) -> Tensor:
        """(N, D), (K, D) -> (N,) index of the nearest code: argmin ||z||^2 - 2 z.e + ||e||^2 (ties: lowest)."""
        dist = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ embed.t() + embed.pow(2).sum(1)[None]  # (N, K)
        return dist.argmin(1)

    @torch.no_grad()
    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = z.shape
        idx = self._nearest(_to_rows(z), self.embed.detach().float())  # (N,)
        return self.codes(idx.view(b, h, w)), idx.view(b, h, w)

    def codes(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, D, h, w) codebook vectors."""
        return F.embedding(indices, self.embed).float().permute(0, 3, 1, 2).contiguous()

    # -- the training path --------------------------------------------------------------------
    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        b, _, h, w = z.shape
        rows = _to_rows(z)  # z_e, (N, D)
        if self.training and not bool(self.initialised):
            self._kmeans(rows.detach())
        idx = self._nearest(rows.detach(), self.embed.detach().float())  # (N,)
        # F.embedding saves only the indices for backward, so the in-place updates below are safe.
        z_q = F.embedding(idx, self.embed).float()  # e_k, (N, D)
        losses = {}
        if not self.ema:
            losses["codebook"] = F.mse_loss(z_q, rows.detach())  # ||sg[z_e] - e||^2, eq. 3's second term
        losses["commitment"] = self.beta * F.mse_loss(rows, z_q.detach())  # beta ||z_e - sg[e]||^2, eq. 3's third
        if self.training:
            self._update(rows.detach(), idx)
        # Straight-through (sec. 3.1): the forward pass is e_k, the backward pass copies dL/dz_q to z_e.
        z_st = rows + (z_q - rows).detach()
        return _to_grid(z_st, (b, h, w)), idx.view(b, h, w), losses

    def _generator(self, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(int(self.seed) * 1_000_003 + int(self.batches))

    @torch.no_grad()
    def _set_codes(self, mask: Tensor, vectors: Tensor) -> None:
        """Reset the codes where mask (K,) is True to vectors (k, D), as fresh codes of FRESH_SIZE."""
        self.embed[mask] = vectors.to(self.embed.dtype)
        self.cluster_size[mask] = FRESH_SIZE
        if self.ema:
            self.embed_sum[mask] = vectors * FRESH_SIZE

    @torch.no_grad()
    def _kmeans(self, rows: Tensor) -> None:
        """Lloyd's k-means on the first training batch's encoder outputs (N, D); an empty cluster keeps its centre."""
        g = self._generator(rows.device)
        n, k = rows.shape[0], self.num_codes
        pick = (torch.randperm(n, generator=g, device=rows.device)[:k] if n >= k
                else torch.randint(n, (k,), generator=g, device=rows.device))
        centres = rows[pick].clone()  # (K, D)
        for _ in range(KMEANS_ITERS):
            idx = self._nearest(rows, centres)
            counts = torch.bincount(idx, minlength=k).float()  # (K,)
            sums = torch.zeros_like(centres).index_add_(0, idx, rows)  # (K, D)
            centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        self._set_codes(torch.ones(k, dtype=torch.bool, device=rows.device), centres)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _update(self, rows: Tensor, idx: Tensor) -> None:
        """One batch of EMA codebook updates (appendix A.1, eqs. 6-8) and dead-code restarts."""
        self.batches += 1
        counts = torch.bincount(idx, minlength=self.num_codes).float()  # n_i, (K,)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)  # N_i <- g N_i + (1 - g) n_i (eq. 6)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, rows)  # sum_j z_{i,j}, (K, D)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)  # m_i <- g m_i + (1 - g) sum (eq. 7)
            # Laplace-smoothed N_i, so a code that lost its vectors is not divided by ~0.
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + LAPLACE_EPS) / (total + self.num_codes * LAPLACE_EPS) * total
            self.embed.copy_(self.embed_sum / smoothed[:, None])  # e_i = m_i / N_i (eq. 8)
        if self.restart_dead:
            dead = self.cluster_size < self.dead_code_threshold  # (K,)
            k = int(dead.sum())
            if k:
                g = self._generator(rows.device)
                n = rows.shape[0]
                pick = (torch.randperm(n, generator=g, device=rows.device)[:k] if n >= k
                        else torch.randint(n, (k,), generator=g, device=rows.device))
                self._set_codes(dead, rows[pick])


class FSQ(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2023, sec. 3): channel c of z is bounded to L_c levels and
    rounded; the code is the tuple of rounded values, its index the mixed-radix number they spell.

    ``levels`` (D,) gives L_c per channel, so z has D = len(levels) channels and there are prod(L_c) codes.
    Quantised values are normalised to [-1, 1] (round(bound(z)) / (L_c // 2)), as in the paper's code.
    """

    def __init__(self, levels: list[int]):
        super().__init__()
        if not levels or any(int(level) < 2 for level in levels):
            raise GenaiError(f"model.fsq_levels must list one level count >= 2 per channel, got {levels}; "
                             "the paper uses e.g. [8, 6, 5] (240 codes) or [8, 5, 5, 5] (1000)")
        self.levels = [int(level) for level in levels]
        self.dim = len(self.levels)
        self._num_codes = math.prod(self.levels)
        # Per-channel constants, (1, D, 1, 1); not persistent: the config gives them.
        lv = torch.tensor(self.levels, dtype=torch.float32).view(1, -1, 1, 1)
        basis = torch.tensor([math.prod(self.levels[:c]) for c in range(self.dim)]).view(1, -1, 1, 1)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_half_width", torch.div(lv, 2, rounding_mode="floor"), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)  # mixed radix: 1, L_0, L_0 L_1, ...

    @property
    def num_codes(self) -> int:
        return self._num_codes

    def bound(self, z: Tensor) -> Tensor:
        """(B, D, h, w) -> the same, channel c in (-L_c/2 - 1/2, L_c/2 - 1/2) roughly, so rounding gives L_c values.

        half_l = (L - 1)(1 - eps) / 2; an even L needs the half offset (its levels are -L/2 .. L/2 - 1), and the
        shift tan(offset / half_l), as in the paper's appendix A code, puts z = 0 near a level (it stays finite
        for L = 2, where atanh would not)."""
        half_l = (self._levels - 1) * (1 - FSQ_EPS) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.tan(offset / half_l)
        return torch.tanh(z.float() + shift) * half_l - offset

    def _round(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D, h, w) -> (bounded z, its rounding: integers in -(L // 2) .. (L - 1) // 2)."""
        zb = self.bound(z)
        return zb, torch.round(zb)

    def _index(self, rounded: Tensor) -> Tensor:
        """Rounded values (B, D, h, w) -> indices (B, h, w): digits r + L // 2 in 0..L-1, mixed radix."""
        digits = rounded.long() + self._half_width.long()
        return (digits * self._basis).sum(1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        zb, r = self._round(z)
        # Straight-through rounding (sec. 3: "round_ste"), then normalise to [-1, 1].
        z_q = (zb + (r - zb).detach()) / self._half_width
        return z_q, self._index(r.detach()), {}

    @torch.no_grad()
    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        _, r = self._round(z)
        return r / self._half_width, self._index(r)

    def codes(self, indices: Tensor) -> Tensor:
        """(B, h, w) long -> (B, D, h, w) normalised code values."""
        digits = torch.div(indices[:, None], self._basis, rounding_mode="floor") % self._levels.long()
        return (digits - self._half_width.long()).float() / self._half_width

    def indices(self, codes: Tensor) -> Tensor:
        """(B, D, h, w) normalised code values -> (B, h, w) indices (the inverse of ``codes``)."""
        return self._index(torch.round(codes.float() * self._half_width))
