"""What the autoregressive families share (LSTM, Row LSTM, PixelCNN, transformer), over images or text.

An image (B, C, H, W) in [0, 1] becomes a sequence of T = H * W * C tokens: each sub-pixel is quantised
to one of K levels (round(x * (K - 1))), pixels in raster order (row by row, left to right) and, within
a pixel, the channels in order (R, then G, then B). The model factorises
    p(x) = prod_t p(x_t | x_<t)                      (van den Oord et al. 2016, PixelRNN, Eq. 1-2)
and outputs (B, T, K) logits, position t predicting token t from tokens < t only.

``AutoregressiveImageModel`` (a mixin for ``GenerativeModel``, in ``genai_cli/models/autoregressive.py``) holds
the plumbing every such family needs: the loss (categorical NLL in nats per dimension), the exact log-likelihood
(nats per image), and ``sample``: the raster loop that draws each token through ``genai_cli.sampling`` after
completing a prefix of real rows. A family implements ``embed`` / ``logits_from_embedding`` (the training forward,
split so that tests can take gradients with respect to each position's input) and ``incremental`` (a
stepper that computes only what the next token needs: a carried LSTM state, a key/value cache, the one
pixel being sampled).

Text (a ``TokenSpec``): the data already is token ids, K is the vocabulary and T the block size; ``sample``
continues a ``prompt`` by ``max_new_tokens`` characters and returns the token ids. A family with a bounded
context (learned positions: the transformer) slides its window when the text outgrows it: the last T / 2 tokens
are run again as a fresh prefix, so generation costs one prefix pass per T / 2 new tokens beside the single
steps; a recurrent family carries its state through any length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..spec import ImageSpec, Spec, TokenSpec

# (tokens (n, T) with tokens[:, :pos] final, pos) -> logits (n, K) of token pos.
TokenStepper = Callable[[Tensor, int], Tensor]

AR_SAMPLE_OPTIONS = frozenset({"temperature", "top_k", "top_p", "greedy", "noise_std", "noise_on", "prefix_rows"})
TEXT_OPTIONS = frozenset({"prompt", "max_new_tokens"})  # options of families that also model text
DEFAULT_NEW_TOKENS = 256  # characters a text model writes when --max-new-tokens is not given


def prompt_ids(spec: TokenSpec, prompt: str | Tensor | None, blank: str | None = None) -> Tensor:
    """A prompt (text, or token ids) -> (P,) long ids; an unknown character is a one-line error naming it."""
    if prompt is None:
        return torch.zeros(0, dtype=torch.long)
    if isinstance(prompt, Tensor):
        return prompt.long().reshape(-1)
    if not isinstance(prompt, str):
        raise GenaiError(f"--prompt must be text, got {type(prompt).__name__}")
    return torch.tensor(spec.encode(prompt, blank), dtype=torch.long)


def check_modality_options(spec: Spec, prompt=None, max_new_tokens=None, prefix_rows=None) -> None:
    """--prompt and --max-new-tokens are for text runs, --prefix-rows for image runs: one line when crossed."""
    if spec.kind == "tokens" and prefix_rows:
        raise GenaiError("--prefix-rows completes images; this run models text: continue a text with --prompt")
    if spec.kind != "tokens" and (prompt is not None or max_new_tokens is not None):
        flag = "--prompt" if prompt is not None else "--max-new-tokens"
        raise GenaiError(f"{flag} continues a text; this run models {spec.describe()} images: complete images with "
                         f"--prefix-rows")
    if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                       or max_new_tokens < 1):
        raise GenaiError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")


def resolve_levels(levels: int, spec: ImageSpec) -> int:
    """The number K of intensity levels: the config's, or for 0, 2 on binary data and 256 otherwise."""
    if levels == 0:
        return 2 if spec.binary else 256
    if not 2 <= levels <= 65536:
        raise GenaiError(f"model.levels = {levels} is not a usable number of intensity levels: "
                         "use 2 (binary), 4, 16 or 256, or 0 to choose from the data")
    return levels


def token_shape(levels: int, spec: Spec) -> tuple[int, int]:
    """(K, T) of a model over ``spec``'s tokens: text, its vocabulary and block size (``model.levels`` refused);
    images, ``resolve_levels`` and T = H * W * C sub-pixels."""
    if spec.kind == "tokens":
        if levels:
            raise GenaiError("model.levels sets the intensity levels of images; a text model's tokens are its "
                             "characters: drop model.levels")
        return spec.vocab_size, spec.block_size
    return resolve_levels(levels, spec), spec.dims


def quantize(x: Tensor, levels: int) -> Tensor:
    """Pixels in [0, 1] -> level indices in 0..K-1 (long): round(x * (K - 1)), halves rounded up.

    (torch.round sends halves to even, so 0.5 would become 0 for K = 2 but 2 for K = 4.)
    """
    return torch.floor(x.float().clamp(0, 1) * (levels - 1) + 0.5).long()


def dequantize(idx: Tensor, levels: int) -> Tensor:
    """Level indices -> pixel values level / (K - 1) in [0, 1] (float32)."""
    return idx.float() / (levels - 1)


def image_to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W * C) in raster order, channels innermost."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def tokens_to_image(tokens: Tensor, spec: ImageSpec) -> Tensor:
    """(B, H * W * C) -> (B, C, H, W), the inverse of ``image_to_tokens``."""
    c, h, w = spec.shape
    return tokens.reshape(tokens.shape[0], h, w, c).permute(0, 3, 1, 2)


def conv_logits_to_seq(logits: Tensor, channels: int, levels: int) -> Tensor:
    """Convolutional logits (B, C * K, H, W), channel-major, -> (B, T, K) in token order."""
    b, _, h, w = logits.shape
    return logits.reshape(b, channels, levels, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * channels, levels)


def categorical_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """-log p(x) in nats per image, (B,), from logits (B, T, K) and tokens (B, T)."""
    b, t, k = logits.shape
    # cross_entropy runs in float32 under autocast; cast anyway so bf16 logits never sum in bf16.
    nll = F.cross_entropy(logits.reshape(b * t, k).float(), tokens.reshape(b * t), reduction="none")
    return nll.reshape(b, t).sum(1)


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Bool (q_len, k_len), True where query may attend key, for the last q_len of k_len positions.

    Query q sits at absolute position k_len - q_len + q and sees keys at positions <= its own; with a
    key/value cache holding the first k_len - q_len positions this is the mask of one incremental chunk.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    return torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
