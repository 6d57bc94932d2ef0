"""What the autoregressive families share (LSTM, Row LSTM, PixelCNN, transformer), over images or text.

An image (B, C, H, W) in [0, 1] becomes a sequence of T = H * W * C tokens: each sub-pixel is quantised
to one of K levels (round(x * (K - 1))), pixels in raster order (row by row, left to right) and, within
a pixel, the channels in order (R, then G, then B). The model factorises
    p(x) = prod_t p(x_t | x_<t)                      (van den Oord et al. 2016, PixelRNN, Eq. 1-2)
and outputs (B, T, K) logits, position t predicting token t from tokens < t only.

``AutoregressiveImageModel`` (a mixin for ``GenerativeModel``) holds the plumbing every such family
needs: the loss (categorical NLL in nats per dimension), the exact log-likelihood (nats per image), and
``sample``: the raster loop that draws each token through ``genai_cli.sampling`` after completing a
prefix of real rows. A family implements ``embed`` / ``logits_from_embedding`` (the training forward,
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

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..sampling import check_sampling_options, sample_logits
from ..spec import ImageSpec, Spec, TokenSpec

# (tokens (n, T) with tokens[:, :pos] final, pos) -> logits (n, K) of token pos.
Stepper = Callable[[Tensor, int], Tensor]

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


class AutoregressiveImageModel:
    """Loss, log-likelihood and the sampling loop of the raster-order families (see the module doc).

    A mixin, listed before ``GenerativeModel``: ``class PixelCNN(AutoregressiveImageModel, GenerativeModel)``
    (it does not subclass it, so that this module needs nothing from ``genai_cli.models``).
    """

    discrete = True
    sample_options = AR_SAMPLE_OPTIONS
    # True where a recurrent hidden state exists, so --noise-on hidden has something to perturb.
    has_hidden_state: ClassVar[bool] = False
    # True where positions are learned for T tokens (the transformer): text longer than T slides the window.
    bounded_context: ClassVar[bool] = True

    def __init__(self, config, spec: Spec):
        super().__init__(config, spec)
        self.levels, self.seq_len = token_shape(config.levels, spec)

    # -- what a family implements -----------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Tokens (B, T) -> one differentiable input per data position, (B, T, ...), not yet shifted."""
        raise NotImplementedError

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        """(B, T, ...) -> logits (B, T, K); position t may depend on e[:, :t] only."""
        raise NotImplementedError

    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> Stepper:
        """A stepper for n images that keeps what it computed between calls (pos increases by one)."""
        raise NotImplementedError

    def naive_logits(self, tokens: Tensor, pos: int) -> Tensor:
        """The reference a stepper must match: the full forward re-run, keeping position pos."""
        return self.seq_logits(tokens)[:, pos]

    # -- training and likelihood ------------------------------------------------------------------
    def tokenize(self, x: Tensor) -> Tensor:
        if self.spec.kind == "tokens":
            return x.long()  # (B, T) token ids already
        return image_to_tokens(quantize(x, self.levels))

    def seq_logits(self, tokens: Tensor) -> Tensor:
        return self.logits_from_embedding(self.embed(tokens))

    def loss(self, batch) -> dict[str, Tensor]:
        x, _ = batch
        tokens = self.tokenize(x)
        logits = self.seq_logits(tokens)  # (B, T, K)
        nll = F.cross_entropy(logits.reshape(-1, self.levels).float(), tokens.reshape(-1))  # nats per dim
        return {"loss": nll, "bits_per_dim": nll.detach() / math.log(2)}

    def log_likelihood(self, batch) -> Tensor:
        """Exact log p(x) of the quantised images, nats per image, (B,)."""
        tokens = self.tokenize(batch[0])
        return -categorical_nll(self.seq_logits(tokens), tokens)

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, greedy: bool | None = None,
               noise_std: float | None = None, noise_on: str | None = None, prefix_rows: int | None = None,
               prefix: Tensor | None = None, prompt: str | Tensor | None = None,
               max_new_tokens: int | None = None) -> Tensor:
        """Draw n images (n, C, H, W) in [0, 1] token by token, reusing computation between tokens; for a text
        model, n texts (n, P + max_new_tokens) of token ids continuing ``prompt`` (P characters, may be empty).

        ``prefix`` (m, C, H, W) in [0, 1] with n a multiple of m: its first ``prefix_rows`` rows are kept
        and the rest is generated, n // m completions per image, consecutive.
        """
        return self._sample(n, generator, naive=False, temperature=temperature, top_k=top_k, top_p=top_p,
                            greedy=greedy, noise_std=noise_std, noise_on=noise_on, prefix_rows=prefix_rows,
                            prefix=prefix, prompt=prompt, max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def sample_naive(self, n: int, *, generator: torch.Generator | None = None, **options) -> Tensor:
        """As ``sample``, but re-running the full forward for every token (the reference; slow)."""
        return self._sample(n, generator, naive=True, **options)

    def _sample(self, n: int, generator: torch.Generator | None, naive: bool, temperature: float | None = None,
                top_k: int | None = None, top_p: float | None = None, greedy: bool | None = None,
                noise_std: float | None = None, noise_on: str | None = None, prefix_rows: int | None = None,
                prefix: Tensor | None = None, prompt: str | Tensor | None = None,
                max_new_tokens: int | None = None) -> Tensor:
        text = self.spec.kind == "tokens"
        check_modality_options(self.spec, prompt, max_new_tokens, prefix_rows)
        check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, noise_std=noise_std,
                               prefix_rows=None if text else prefix_rows, height=None if text else self.spec.size,
                               noise_on=noise_on)
        temperature = 1.0 if temperature is None else float(temperature)
        noise_std = float(noise_std or 0.0)
        noise_on = noise_on or "logits"
        if noise_on == "hidden" and not self.has_hidden_state:
            name = type(self).__name__
            raise GenaiError(f"{name} has no recurrent hidden state to add noise to: use --noise-on logits")
        if noise_on == "hidden" and naive and noise_std:
            raise GenaiError("the naive sampler re-runs the forward and cannot replay noise on the hidden state: "
                             "use --noise-on logits")
        if text:
            given = prompt_ids(self.spec, prompt).to(self.device)
            length = given.shape[0] + (DEFAULT_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
            tokens = torch.zeros(n, length, dtype=torch.long, device=self.device)
            tokens[:, :given.shape[0]] = given
            start = given.shape[0]
        else:
            length = self.seq_len
            tokens = torch.zeros(n, length, dtype=torch.long, device=self.device)
            start = self._fill_prefix(tokens, prefix, prefix_rows or 0)

        def new_stepper() -> Stepper:
            if naive:
                return self.naive_logits
            return self.incremental(n, noise_std if noise_on == "hidden" else 0.0, generator)

        step, window = new_stepper(), 0  # the stepper sees tokens[:, window:]
        if self.bounded_context and start > self.seq_len:
            window = start - self.seq_len // 2  # a long prompt: its last T / 2 tokens as the first prefix
        logit_noise = noise_std if noise_on == "logits" else 0.0
        was_training = self.training
        self.eval()
        try:
            for pos in range(start, length):
                if self.bounded_context and pos - window >= self.seq_len:  # the window is full: slide by T / 2
                    window, step = pos - self.seq_len // 2, new_stepper()
                logits = step(tokens[:, window:], pos - window)  # (n, K), from tokens[:, :pos] only
                tokens[:, pos] = sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                               greedy=bool(greedy), noise_std=logit_noise, generator=generator)
        finally:
            self.train(was_training)
        if text:
            return tokens
        return dequantize(tokens_to_image(tokens, self.spec), self.levels)

    def _fill_prefix(self, tokens: Tensor, prefix: Tensor | None, prefix_rows: int) -> int:
        """Write the first prefix_rows rows of the quantised prefix into tokens; return the first free position."""
        if prefix_rows == 0:
            return 0
        if prefix is None:
            raise GenaiError("--prefix-rows needs real images to complete: pass prefix=(n, C, H, W) images in [0, 1]")
        n = tokens.shape[0]
        if prefix.dim() != 4 or tuple(prefix.shape[1:]) != self.spec.shape or n % prefix.shape[0]:
            expected = ", ".join(map(str, self.spec.shape))
            raise GenaiError(f"prefix images have shape {tuple(prefix.shape)}, expected (m, {expected}) with {n} "
                             "samples a multiple of m: load images from the dataset the model was trained on")
        prefix = prefix.to(tokens.device).repeat_interleave(n // prefix.shape[0], dim=0)
        start = prefix_rows * self.spec.size * self.spec.channels
        tokens[:, :start] = self.tokenize(prefix)[:, :start]
        return start


def pixel_of(pos: int, spec: ImageSpec) -> tuple[int, int, int]:
    """Token position -> (row, column, channel)."""
    pix, ch = divmod(pos, spec.channels)
    row, col = divmod(pix, spec.size)
    return row, col, ch


class PixelStepper:
    """A stepper for convolutional families: compute one pixel through every layer, never the whole image.

    Every layer's output at pixel (i, j) depends only on pixels before it (and on earlier channels of
    (i, j)), so once computed it is final and can be cached in per-layer buffers; the next pixel reads
    its neighbours from them (the idea of Ramachandran et al. 2017, "Fast Generation for Convolutional
    Autoregressive Models"). A family subclasses this and implements ``write`` (store a known token in
    its input buffers) and ``compute`` (one pixel through the network, returning (n, C, K) logits).
    With RGB, a pixel is computed again for each channel, as each sampled channel unlocks the next.
    """

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.written = 0  # tokens already stored in the input buffers
        self.next_pixel = 0  # first pixel whose activations are not final yet

    def write(self, pos: int, values: Tensor) -> None:
        raise NotImplementedError

    def compute(self, pixel: int, last: bool) -> Tensor:
        """Pixel ``pixel`` through all layers -> (n, C, K); ``last``: the pixel being sampled (not catch-up)."""
        raise NotImplementedError

    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        for t in range(self.written, pos):
            self.write(t, tokens[:, t])
        self.written = pos
        pixel, channel = divmod(pos, self.spec.channels)
        for p in range(self.next_pixel, pixel):  # pixels given by a prefix: computed once, all channels known
            self.compute(p, last=False)
        logits = self.compute(pixel, last=True)
        # The pixel is final once every channel but the last is known: the last channel is read by no layer here.
        self.next_pixel = pixel + 1 if channel == self.spec.channels - 1 else pixel
        return logits[:, channel]
