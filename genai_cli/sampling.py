"""Pure functions on logits: temperature, top-k, top-p (nucleus), noise, and the draw itself.

Every discrete family (pixel LSTM, Row LSTM, PixelCNN, pixel transformer, MaskGIT, ...) draws its
tokens through ``sample_logits`` so that ``--temperature``, ``--top-k``, ``--top-p``, ``--greedy`` and
``--noise-std`` mean the same thing everywhere. Logits are over the last dimension; everything else is
batch. Binary outputs are two-class logits and take the same path.

Order of operations (the definition the tests check):
  1. ``noise_std``: Gaussian noise is added to the raw logits (the deck's noise injection), so it can
     change which values survive the filters and, under ``greedy``, which value wins;
  2. temperature divides the logits (temperature 0 means greedy: only the argmax is kept);
  3. top-k keeps the k largest logits;
  4. top-p keeps, of what top-k left, the smallest set of values whose cumulative probability (softmax
     of the remaining logits) is at least p (Holtzman et al. 2020, "The Curious Case of Neural Text
     Degeneration", Sec. 3.1);
  5. one value is drawn from the softmax of what remains, or the argmax is taken under ``greedy``.
Ties are broken towards the lower index, as ``torch.argmax`` does, so ``top_k=1`` is exactly argmax
and the nucleus is one well-defined set. At least one value always survives.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .errors import GenaiError

# Slack on the cumulative probability in top-p, so that a nucleus reaching p exactly (0.5 + 0.25 for
# p = 0.75) is not pushed one value further by float32 rounding of the softmax.
TOP_P_TOLERANCE = 1e-6


def check_sampling_options(temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                           noise_std: float | None = None, prefix_rows: int | None = None,
                           height: int | None = None, noise_on: str | None = None) -> None:
    """Raise GenaiError (one line: the problem and the fix) for a sampling option value that cannot work.

    ``None`` means "not given" and is always accepted. ``height`` is the image height that bounds
    ``prefix_rows``; the CLI calls this before loading data, the families call it again in ``sample``.
    """
    if temperature is not None:
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise GenaiError(f"--temperature must be a finite number >= 0 (got {temperature!r}): "
                             "use 1 for the model's own distribution, 0 or --greedy for the most likely value")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise GenaiError(f"--top-k must be an integer >= 1 (got {top_k!r}): "
                             "use --top-k 1 for greedy draws, or leave it out to keep every value")
    if top_p is not None:
        if not _is_number(top_p) or not (0 < top_p <= 1):
            raise GenaiError(f"--top-p must be in (0, 1] (got {top_p!r}): "
                             "use e.g. --top-p 0.9, or leave it out (same as 1) to keep every value")
    if noise_std is not None:
        if not _is_number(noise_std) or not math.isfinite(noise_std) or noise_std < 0:
            raise GenaiError(f"--noise-std must be a finite number >= 0 (got {noise_std!r}): use e.g. --noise-std 0.1")
    if noise_on is not None and noise_on not in ("logits", "hidden"):
        raise GenaiError(f"--noise-on must be 'logits' or 'hidden' (got {noise_on!r})")
    if prefix_rows is not None:
        if isinstance(prefix_rows, bool) or not isinstance(prefix_rows, int) or prefix_rows < 0:
            raise GenaiError(f"--prefix-rows must be an integer >= 0 (got {prefix_rows!r}): "
                             "use 0 for plain generation")
        if height is not None and prefix_rows > height:
            raise GenaiError(f"--prefix-rows {prefix_rows} is beyond the image height {height}: "
                             f"use a value from 0 to {height}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Apply temperature, then top-k, then top-p over the last dim; removed entries become -inf.

    Returns float32 (or float64 for float64 input) logits of the same shape. Temperature 0 keeps only
    the argmax. ``top_k=None`` and ``top_p=None`` (or 1) keep everything.
    """
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
    return _filter(logits, temperature, top_k, top_p)


def _filter(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """``filter_logits`` without the option check (``sample_logits`` has made it already)."""
    # Filters compare probabilities: do it in at least float32 (bf16 logits from autocast are too coarse).
    out = logits.double() if logits.dtype == torch.float64 else logits.float()
    if temperature == 0:
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep.scatter_(-1, out.argmax(-1, keepdim=True), True)
        return out.masked_fill(~keep, -math.inf)
    if temperature != 1:
        out = out / temperature
    k_active = top_k is not None and top_k < out.shape[-1]
    p_active = top_p is not None and top_p < 1
    if not (k_active or p_active):
        return out
    # A stable descending sort puts tied values in index order, so ties break towards the lower index.
    sorted_logits, order = torch.sort(out, dim=-1, descending=True, stable=True)  # (..., K)
    rank = torch.arange(out.shape[-1], device=out.device)
    keep_sorted = torch.ones_like(sorted_logits, dtype=torch.bool)
    if k_active:
        keep_sorted &= rank < top_k
    if p_active:
        probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, -math.inf), dim=-1)
        # Probability mass strictly before each entry: an entry is needed while that mass is still < p.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep_sorted &= (mass_before < top_p - TOP_P_TOLERANCE) | (rank == 0)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return out.masked_fill(~keep, -math.inf)


def sample_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  greedy: bool = False, noise_std: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
    """Draw one index per row of ``logits`` (..., K) -> LongTensor (...).

    ``greedy`` (or temperature 0) takes the argmax of the (noisy) logits; otherwise one value is drawn
    from the softmax of ``filter_logits``. Every random draw takes ``generator``.
    """
    return token_sampler(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, noise_std=noise_std,
                         generator=generator)(logits)


def token_sampler(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  greedy: bool = False, noise_std: float = 0.0,
                  generator: torch.Generator | None = None) -> Callable[[Tensor], Tensor]:
    """``sample_logits`` with its options checked and decided once: a loop that draws a token per step (thousands
    of steps, each a few operations at batch 1) calls the returned function on each step's logits."""
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, noise_std=noise_std)
    argmax = greedy or temperature == 0  # top-k and top-p always keep the argmax: they cannot change a greedy draw

    def draw(logits: Tensor) -> Tensor:
        if logits.dtype != torch.float64 and logits.dtype != torch.float32:
            logits = logits.float()  # bf16 logits from autocast are too coarse to filter and normalise
        if noise_std:
            noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            logits = logits + noise_std * noise
        if argmax:
            return logits.argmax(-1)
        probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1)  # removed entries: probability 0
        return draw_categorical(probs, generator)
    return draw


def draw_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of ``probs`` (..., K), drawn with probability probs[..., i] -> LongTensor (...).

    The exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is i with probability p_i (the
    winner is the smallest E_i / p_i, an Exp(p_i) race). ``torch.multinomial(probs, 1)`` draws the very same
    way from the same generator stream, so the draws are identical to it (a test holds this), but without its
    argument checks (three passes over probs and a host sync) and the reshapes around it: about 3x cheaper at
    decoding's one row of K = 65 (benchmarks/bench_decode.py), where these few microseconds add up per token.
    """
    race = torch.empty_like(probs).exponential_(generator=generator)  # (..., K) E_i
    return torch.div(probs, race, out=race).argmax(-1)
