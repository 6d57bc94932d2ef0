"""The likelihood of 8-bit pixels under a continuous decoder, discretised into their 256 bins.

Used by every family that reports bits/dim from a Gaussian or Laplace over pixel values (the VAE's decoders,
the DDPM bound's L0, Ho et al. 2020 eq. 13): the 256 bin masses sum to 1, so the figure is a bound on the
probability of the 8-bit image and comparable with the autoregressive families' exact likelihoods.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LEVELS = 256  # 8-bit grey levels: the data a Gaussian or Laplace decoder is discretised onto
HALF_BIN = 0.5 / (LEVELS - 1)  # level k sits at k / 255 in [0, 1], its bin reaches half a level either side


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(-a)) for a > 0, accurate at both ends (Maechler 2012); a is clamped away from 0. Each
    branch of where() sees only its own range, so the branch not taken gives finite values and no NaN gradient."""
    small, large = a.clamp(min=1e-12, max=math.log(2)), a.clamp(min=math.log(2))
    return torch.where(a < math.log(2), torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


def _log_cdf(u: Tensor, kind: str) -> Tensor:
    """log F(u) of the standard Gaussian or Laplace at standardised u = (t - mean) / scale."""
    if kind == "gaussian":
        return torch.special.log_ndtr(u)
    # Laplace: F(u) = exp(u) / 2 below 0, 1 - exp(-u) / 2 above; each branch sees only its own side (finite
    # values on both sides of where(), so no NaN gradient leaks from the branch not taken).
    return torch.where(u < 0, u.clamp(max=0) - math.log(2), torch.log1p(-0.5 * torch.exp(-u.clamp(min=0))))


def discretized_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, kind: str) -> Tensor:
    """log P(x) per pixel, same shape as x, for 8-bit pixels x = k / 255 under a Gaussian or Laplace (``kind``)
    with this mean and scale, discretised into 256 bins: [x - 1/510, x + 1/510], the first bin open down to
    -inf and the last up to +inf, so the 256 probabilities sum to 1 (the DDPM decoder of Ho et al. 2020,
    eq. 13, on [0, 1]).

    A bin's mass F(hi) - F(lo) is formed in log space from the side of the mean it lies on (the survival
    function S = 1 - F above the mean, F below, both symmetric), so far tails neither cancel nor underflow.
    """
    scale = log_scale.exp()
    lo, hi = (x - HALF_BIN - mean) / scale, (x + HALF_BIN - mean) / scale  # standardised bin edges
    log_f_hi, log_f_lo = _log_cdf(hi, kind), _log_cdf(lo, kind)
    log_s_lo, log_s_hi = _log_cdf(-lo, kind), _log_cdf(-hi, kind)  # S(u) = F(-u) for both
    below = log_f_hi + _log1mexp(log_f_hi - log_f_lo)  # log(F(hi) - F(lo)), for bins below the mean
    above = log_s_lo + _log1mexp(log_s_lo - log_s_hi)  # log(S(lo) - S(hi)), for bins above it
    inner = torch.where(x > mean, above, below)
    first, last = x < HALF_BIN, x > 1 - HALF_BIN  # the end bins: log F(hi), log S(lo)
    return torch.where(first, log_f_hi, torch.where(last, log_s_lo, inner))
