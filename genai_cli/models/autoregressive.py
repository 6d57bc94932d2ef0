"""The model-level mixin of the autoregressive families (LSTM, Row LSTM, PixelCNN, transformer), over images or
text: loss, exact log-likelihood and the sampling loop. The layers and token plumbing it uses are in
``genai_cli.nn.autoregressive`` (whose module doc describes the factorisation and the text windows).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..hardware import largest_layer, step_threads
from ..nn.autoregressive import (
    AR_SAMPLE_OPTIONS,
    DEFAULT_NEW_TOKENS,
    TokenStepper,
    categorical_nll,
    check_modality_options,
    dequantize,
    image_to_tokens,
    prompt_ids,
    quantize,
    token_shape,
    tokens_to_image,
)
from ..sampling import check_sampling_options, token_sampler
from ..spec import ImageSpec, Spec


class AutoregressiveImageModel:
    """Loss, log-likelihood and the sampling loop of the raster-order families (see the module doc).

    A mixin, listed before ``GenerativeModel``: ``class PixelCNN(AutoregressiveImageModel, GenerativeModel)``
    (it does not subclass it, so that this module needs nothing from ``genai_cli.models``).
    """

    discrete = True
    sample_options = AR_SAMPLE_OPTIONS
    capabilities = frozenset({"log_likelihood", "seq_logits"})
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

    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> TokenStepper:
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

    def network_evaluations(self, options) -> int:
        """One incremental pass per drawn token: every position of an image (fewer after a prefix), or a text's
        new tokens."""
        if self.spec.kind == "tokens":
            new = options.get("max_new_tokens")
            return DEFAULT_NEW_TOKENS if new is None else int(new)
        return self.seq_len - (options.get("prefix_rows") or 0) * self.spec.size * self.spec.channels

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

        def new_stepper() -> TokenStepper:
            if naive:
                return self.naive_logits
            return self.incremental(n, noise_std if noise_on == "hidden" else 0.0, generator)

        step, window = new_stepper(), 0  # the stepper sees tokens[:, window:]
        if self.bounded_context and start > self.seq_len:
            window = start - self.seq_len // 2  # a long prompt: its last T / 2 tokens as the first prefix
        logit_noise = noise_std if noise_on == "logits" else 0.0
        greedy = bool(greedy)
        seen, columns = tokens[:, window:], tokens.unbind(1)  # (n, length - window); length views (n,)
        draw = token_sampler(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, noise_std=logit_noise,
                             generator=generator)  # options checked once, not per token
        was_training = self.training
        self.eval()
        # The loop is thousands of tiny operations in sequence: inference mode skips autograd's bookkeeping (version
        # counters, view tracking) on each, and a small step runs on one thread without oneDNN (hardware.step_threads).
        try:
            with torch.inference_mode(), step_threads(n * largest_layer(self), self.device):
                for pos in range(start, length):
                    if self.bounded_context and pos - window >= self.seq_len:  # the window is full: slide by T / 2
                        # A stepper with restart() keeps its buffers (a preallocated cache) for the new window.
                        restart = getattr(step, "restart", None)
                        window, step = pos - self.seq_len // 2, restart() if restart else new_stepper()
                        seen = tokens[:, window:]
                    logits = step(seen, pos - window)  # (n, K), from tokens[:, :pos] only
                    # columns[pos] is a view made once: writing through it costs one copy, not an indexing call.
                    columns[pos].copy_(draw(logits))
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
    its input buffers) and ``compute`` (one pixel through the network, returning (n, C, K) logits), and may
    implement ``start_row`` (what a row needs once, from the finished rows above, before its first pixel).
    With RGB, a pixel is computed again for each channel, as each sampled channel unlocks the next.
    """

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.written = 0  # tokens already stored in the input buffers
        self.next_pixel = 0  # first pixel whose activations are not final yet
        self.row = -1  # the row start_row last ran for

    def write(self, pos: int, values: Tensor) -> None:
        raise NotImplementedError

    def start_row(self, i: int) -> None:
        """Before the first pixel of row ``i`` (rows come in order): nothing unless a family needs it."""

    def compute(self, i: int, j: int, last: bool) -> Tensor:
        """Pixel (i, j) through all layers -> (n, C, K); ``last``: the pixel being sampled (not catch-up)."""
        raise NotImplementedError

    def _pixel(self, pixel: int, last: bool) -> Tensor:
        i, j = divmod(pixel, self.spec.size)
        if self.row != i:
            self.start_row(i)
            self.row = i
        return self.compute(i, j, last)

    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        for t in range(self.written, pos):
            self.write(t, tokens[:, t])
        self.written = pos
        pixel, channel = divmod(pos, self.spec.channels)
        for p in range(self.next_pixel, pixel):  # pixels given by a prefix: computed once, all channels known
            self._pixel(p, last=False)
        logits = self._pixel(pixel, last=True)
        # The pixel is final once every channel but the last is known: the last channel is read by no layer here.
        self.next_pixel = pixel + 1 if channel == self.spec.channels - 1 else pixel
        return logits[:, channel]
