"""LSTM (``pixel_lstm`` before text arrived): the next-pixel model, or the next-character model on text.

An image is a sequence of sub-pixels in raster order (a text, of characters); an LSTM reads tokens 0..t-1 and
predicts a categorical distribution over the K levels (the vocabulary) of token t.

Trained with teacher forcing: the input at position t is the true token t-1 (a learned start vector at
t = 0), so one LSTM pass over the sequence gives every position's logits. The LSTM alone cannot know
where a row ends, so each input also carries the target's (row, column) scaled to [0, 1] and, for RGB,
a one-hot of the channel being predicted.

Long sequences (784 steps at 28x28) make backpropagation through time slow and unstable; ``tbptt = k``
truncates it to k steps: the state still flows forward across the whole image, but gradients stop at
every k-th step (the classic remedy; Williams & Peng 1990). Sampling carries the (h, c) state from one
token to the next, so each token costs one LSTM step, not a re-run of the sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import GenaiError
from ..hardware import recurrent_in_fp32
from ..nn.autoregressive import AR_SAMPLE_OPTIONS, TEXT_OPTIONS, TokenStepper
from ..registry import register_model
from .autoregressive import AutoregressiveImageModel
from .base import GenerativeModel, ImageSpec


@dataclass
class Config:
    levels: int = 0  # K intensity levels per sub-pixel: 2 (Bernoulli), 4, 16, 256; 0: 2 on binary data, else 256
    hidden: int = 64  # LSTM hidden size
    layers: int = 1  # stacked LSTM layers
    embed: int = 16  # size of the learned embedding of the previous token
    tbptt: int = 0  # truncate backpropagation through time to this many tokens; 0: through the whole image


@register_model("lstm", "next-token LSTM over the raster sequence of (sub-)pixels or over characters",
                aliases=("pixel_lstm",))
class LSTM(AutoregressiveImageModel, GenerativeModel):
    Config = Config
    tiny = {"hidden": 16, "embed": 8, "levels": 4}
    has_hidden_state = True
    bounded_context = False  # the state carries through a text of any length
    modalities = ("image", "tokens")
    sample_options = AR_SAMPLE_OPTIONS | TEXT_OPTIONS

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if config.hidden < 1 or config.layers < 1 or config.embed < 1:
            raise GenaiError("model.hidden, model.layers and model.embed must be >= 1: fix them in the model section")
        if config.tbptt < 0:
            raise GenaiError(f"model.tbptt = {config.tbptt} is negative: use 0 (full backprop) or a number of steps")
        self.token_embedding = nn.Embedding(self.levels, config.embed)
        self.start = nn.Parameter(torch.zeros(config.embed))  # the "previous token" of position 0
        self.register_buffer("position_features", self._position_features(spec), persistent=False)  # (T, P)
        self.lstm = nn.LSTM(config.embed + self.position_features.shape[1], config.hidden, config.layers,
                            batch_first=True)
        self.out = nn.Linear(config.hidden, self.levels)

    @staticmethod
    def _position_features(spec: ImageSpec) -> Tensor:
        """What each position t predicts: (row, column) in [0, 1], plus a channel one-hot for RGB. (T, P).
        Text has no rows: no features (P = 0)."""
        if spec.kind == "tokens":
            return torch.zeros(spec.block_size, 0)
        c, h, w = spec.shape
        rows = torch.arange(h).repeat_interleave(w * c) / max(h - 1, 1)
        cols = torch.arange(w).repeat_interleave(c).repeat(h) / max(w - 1, 1)
        feats = [rows[:, None], cols[:, None]]
        if c > 1:
            feats.append(torch.eye(c).repeat(h * w, 1))
        return torch.cat(feats, dim=1)

    def _lstm_inputs(self, previous: Tensor, start: int) -> Tensor:
        """Inputs of positions start .. start+L-1 from the embeddings of their previous tokens (B, L, E)."""
        b, length, _ = previous.shape
        if self.position_features.shape[1] == 0:
            return previous  # text: any position, no features
        feats = self.position_features[start:start + length].to(previous.dtype)
        return torch.cat([previous, feats.expand(b, -1, -1)], dim=-1)  # (B, L, E + P)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.token_embedding(tokens)  # (B, T, E)

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        b, t, _ = e.shape
        # Teacher forcing: position t reads token t-1, so shift right by one and put the start vector first.
        previous = torch.cat([self.start.to(e.dtype).expand(b, 1, -1), e[:, :-1]], dim=1)  # (B, T, E)
        x = self._lstm_inputs(previous, 0)
        with self._recurrent_precision(x) as x:
            hidden = self._run_lstm(x)
        return self.out(hidden)  # (B, T, K)

    @contextmanager
    def _recurrent_precision(self, x: Tensor):
        """Run the fused LSTM kernel in fp32 when autocast asks for bf16 on a CPU without native bf16:
        oneDNN has no bf16 LSTM there ("could not create a primitive descriptor"). Elsewhere autocast decides."""
        if torch.is_autocast_enabled(x.device.type) and recurrent_in_fp32(x.device):
            with torch.autocast(x.device.type, enabled=False):
                yield x.float()
        else:
            yield x

    def _run_lstm(self, x: Tensor) -> Tensor:
        """(B, T, in) -> (B, T, hidden), with truncated backprop through time when model.tbptt is set."""
        t = x.shape[1]
        k = self.config.tbptt
        if k and t > k:
            outs, state = [], None
            for s in range(0, t, k):
                out, (h, c) = self.lstm(x[:, s:s + k], state)
                state = (h.detach(), c.detach())  # truncated BPTT: the state flows on, its gradient stops here
                outs.append(out)
            hidden = torch.cat(outs, dim=1)
        else:
            hidden, _ = self.lstm(x)  # (B, T, hidden)
        return hidden

    def cell(self, layer: int, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One time step of LSTM layer ``layer`` with its own weights: (n, in), (n, hidden) x 2 -> (h, c).

        The same maths as ``nn.LSTM`` (gates in its order i, f, g, o) in torch's fused one-step kernel
        (``torch.lstm_cell``: both products, then every gate in one pass), for sampling, where a step costs its
        number of operations: one here, against about ten for the gates written out, or a call of the fused
        sequence kernel with its setup.
        """
        lstm = self.lstm
        return torch.lstm_cell(x, (h, c), getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}"),
                               getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}"))

    def naive_logits(self, tokens: Tensor, pos: int) -> Tensor:
        # The naive sampler's honest form: re-run the LSTM over tokens 0..pos (not over the unknown rest).
        return self.seq_logits(tokens[:, :pos + 1])[:, pos]

    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> TokenStepper:
        return _CarriedState(self, hidden_noise, generator)


class _CarriedState:
    """Keeps the LSTM's (h, c) after the positions done so far; each call advances to ``pos``."""

    def __init__(self, model: LSTM, hidden_noise: float, generator: torch.Generator | None):
        self.model, self.hidden_noise, self.generator = model, hidden_noise, generator
        self.state: tuple[Tensor, Tensor] | None = None  # (layers, n, hidden) each
        self.done = 0  # positions already run through the LSTM

    def __call__(self, tokens: Tensor, pos: int) -> Tensor:
        m = self.model
        n = tokens.shape[0]
        # Previous tokens of positions done..pos (a whole prefix at once the first time, then one).
        prev = m.token_embedding(tokens[:, max(self.done - 1, 0):pos])  # (n, L or L-1, E)
        if self.done == 0:
            prev = torch.cat([m.start.expand(n, 1, -1), prev], dim=1)
        x = m._lstm_inputs(prev, self.done)  # (n, L, E + P)
        if self.state is not None and x.shape[1] == 1:
            h, c = self.state  # (layers, n, hidden) each, or lists of layers (n, hidden) after a step
            top = x[:, 0]
            h, c = list(h), list(c)  # per layer; no stacking back into (layers, n, hidden): never read as one
            for layer in range(m.config.layers):
                top, c[layer] = m.cell(layer, top, h[layer], c[layer])
                h[layer] = top
        else:  # the first call: the start token, or a whole prefix at once
            state = None if self.state is None else tuple(torch.stack(list(t)) for t in self.state)
            with m._recurrent_precision(x) as x:
                out, (h, c) = m.lstm(x, state)
            top = out[:, -1]  # (n, hidden), equal to h[-1]
        if self.hidden_noise:
            # The deck's noise injection: perturb the recurrent state itself, so it carries to later pixels.
            noise = torch.randn(top.shape, generator=self.generator, device=top.device, dtype=top.dtype)
            top = top + self.hidden_noise * noise
            h = [*h[:-1], top]
        self.state, self.done = (h, c), pos + 1
        return m.out(top)  # (n, K)
