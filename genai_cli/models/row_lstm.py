"""PixelRNN's Row LSTM (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Sec. 3.1).

The image is processed row by row, top to bottom; an LSTM state per column is carried from one row to
the next. For row i the gates are
    [o_i, f_i, i_i, g_i] = sigma(K_ss (*) h_{i-1} + K_is (*) x_i)                          (Eq. 3)
    c_i = f_i . c_{i-1} + i_i . g_i,      h_i = o_i . tanh(c_i)
where sigma is the logistic sigmoid for o, f, i and tanh for g. K_ss is a 1 x k convolution over the
previous row's states, so the context is a triangle above the pixel; K_is is a 1 x k convolution over
the current row's input, masked to the pixels on the left, so the input-to-state terms of every row
are computed for the whole image at once before the recurrence runs. The first layer is a k1 x k1
mask-A convolution of the data; Row LSTM layers stack with residual connections (Sec. 3.4); 1x1
mask-B layers give the logits.

RGB: states are split into R, G, B groups and the masks order the sub-pixels (Sec. 3.4, Fig. 4), so
R, then G, then B are predicted, each seeing only what came before it.

``tbptt = k`` truncates backpropagation through the rows: the state flows on, its gradient stops every
k rows. Sampling computes one pixel per token, reading the cached states of the row above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn.autoregressive import TokenStepper, conv_logits_to_seq, tokens_to_image
from ..nn.masked_conv import MaskedConv2d, channel_groups
from ..registry import register_model
from .autoregressive import AutoregressiveImageModel, PixelStepper
from .base import GenerativeModel, ImageSpec


@dataclass
class Config:
    levels: int = 0  # K intensity levels per sub-pixel: 2 (Bernoulli), 4, 16, 256; 0: 2 on binary data, else 256
    hidden: int = 32  # LSTM state channels per layer (a multiple of the image channels)
    layers: int = 2  # stacked Row LSTM layers
    kernel: int = 3  # k of the 1 x k state-to-state and input-to-state convolutions (odd, >= 3)
    first_kernel: int = 7  # k1 of the mask-A convolution on the data (odd)
    tbptt: int = 0  # truncate backpropagation through time every this many rows; 0: through the whole image


def lstm_update(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 3 of PixelRNN, after the convolutions: gates (B, 4h, ...) and c_{i-1} (B, h, ...) -> (h_i, c_i)."""
    i, f, o, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


@register_model("row_lstm", "PixelRNN Row LSTM: an LSTM down the rows, masked 1-D convolutions along each row")
class RowLSTM(AutoregressiveImageModel, GenerativeModel):
    Config = Config
    tiny = {"hidden": 12, "layers": 1, "first_kernel": 3, "levels": 4}
    has_hidden_state = True

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        c, h, k, k1 = spec.channels, config.hidden, config.kernel, config.first_kernel
        if k < 3 or k % 2 == 0 or k1 < 1 or k1 % 2 == 0:
            raise GenaiError(f"model.kernel = {k} must be odd and >= 3, model.first_kernel = {k1} odd: "
                             "use e.g. 3 and 7")
        if config.layers < 1 or config.tbptt < 0:
            raise GenaiError("model.layers must be >= 1 and model.tbptt >= 0: fix them in the model section")
        data = torch.arange(c)
        feat = channel_groups(h, c, "model.hidden")  # (h,) group of each state channel
        gates = feat.repeat(4)  # gate q of unit u is output q * h + u, in u's group
        self.first = MaskedConv2d(c, h, (k1, k1), (k1 // 2, k1 // 2), "A", data, feat)
        # K_is: 1 x k over the current row, anchored mid-kernel, mask B leaves the left half and the pixel itself.
        self.input_to_state = nn.ModuleList(MaskedConv2d(h, 4 * h, (1, k), (0, k // 2), "B", feat, gates)
                                            for _ in range(config.layers))
        # K_ss: 1 x k over the row above, unmasked: that row is entirely in the past.
        self.state_to_state = nn.ModuleList(nn.Conv1d(h, 4 * h, k, padding=k // 2) for _ in range(config.layers))
        self.hidden = MaskedConv2d(h, h, (1, 1), (0, 0), "B", feat, feat)
        logit_groups = torch.arange(c).repeat_interleave(self.levels)  # output c * K + level -> group c
        self.out = MaskedConv2d(h, c * self.levels, (1, 1), (0, 0), "B", feat, logit_groups)

    def embed(self, tokens: Tensor) -> Tensor:
        return tokens.to(self.out.weight.dtype) * (2.0 / (self.levels - 1)) - 1.0  # (B, T) levels -> [-1, 1]

    def _row_lstm(self, layer: int, x: Tensor) -> Tensor:
        """One Row LSTM layer over the whole image: (B, h, H, W) -> states (B, h, H, W)."""
        b, hidden, height, width = x.shape
        i2s = self.input_to_state[layer](x)  # (B, 4h, H, W): every row's input-to-state term at once
        h = c = x.new_zeros(b, hidden, width)  # the state above the first row
        states = []
        for i in range(height):
            if self.config.tbptt and i and i % self.config.tbptt == 0:
                h, c = h.detach(), c.detach()  # truncated BPTT: the gradient stops every tbptt rows
            h, c = lstm_update(i2s[:, :, i] + self.state_to_state[layer](h), c)  # Eq. 3, (B, h, W)
            states.append(h)
        return torch.stack(states, dim=2)

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        feats = self.first(tokens_to_image(e, self.spec))  # (B, h, H, W)
        for layer in range(self.config.layers):
            feats = feats + self._row_lstm(layer, feats)  # residual connections between layers
        logits = self.out(F.relu(self.hidden(F.relu(feats))))  # (B, C * K, H, W)
        return conv_logits_to_seq(logits, self.spec.channels, self.levels)

    def head(self, feats: Tensor) -> Tensor:
        """One pixel's top features (n, h) -> logits (n, C, K)."""
        logits = self.out.pointwise(F.relu(self.hidden.pointwise(F.relu(feats))))
        return logits.reshape(feats.shape[0], self.spec.channels, self.levels)

    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> TokenStepper:
        return _RowPixels(self, n, hidden_noise, generator)


class _RowPixels(PixelStepper):
    """Per layer: the padded input of K_is, and the (h, c) states of every pixel computed so far.

    At the start of a row, K_ss is applied to the finished row above; then each pixel needs only its
    own column: K_is over the cached inputs to its left, one LSTM update, the 1x1 head.
    """

    def __init__(self, model: RowLSTM, n: int, hidden_noise: float, generator: torch.Generator | None):
        super().__init__(model.spec)
        self.m, self.hidden_noise, self.generator = model, hidden_noise, generator
        size, like = model.spec.size, model.out.weight
        states = model.config.hidden
        self.data = model.first.input_buffer(n, size, size, like)
        self.inputs = [conv.input_buffer(n, size, size, like) for conv in model.input_to_state]
        self.h = [like.new_zeros(n, states, size, size) for _ in model.input_to_state]
        self.c = [like.new_zeros(n, states, size, size) for _ in model.input_to_state]
        self.s2s: list[Tensor] = []  # per layer, K_ss (*) h_{i-1}: (n, 4h, W)

    def write(self, pos: int, values: Tensor) -> None:
        i, j = divmod(pos // self.spec.channels, self.spec.size)
        self.m.first.put(self.data, i, j, self.m.embed(values), channel=pos % self.spec.channels)

    def start_row(self, i: int) -> None:
        above = [h[:, :, i - 1] if i else torch.zeros_like(h[:, :, 0]) for h in self.h]
        self.s2s = [conv(h) for conv, h in zip(self.m.state_to_state, above, strict=True)]

    def compute(self, i: int, j: int, last: bool) -> Tensor:
        m = self.m
        feats = m.first.at(self.data, i, j)  # (n, h)
        for layer, conv in enumerate(m.input_to_state):
            conv.put(self.inputs[layer], i, j, feats)
            c_above = self.c[layer][:, :, i - 1, j] if i else torch.zeros_like(feats)
            h, c = lstm_update(conv.at(self.inputs[layer], i, j) + self.s2s[layer][:, :, j], c_above)
            if last and self.hidden_noise and layer == len(m.input_to_state) - 1:
                # Noise on the top layer's state: it feeds the logits and, through K_ss, the rows below.
                h = h + self.hidden_noise * torch.randn(h.shape, generator=self.generator, device=h.device,
                                                        dtype=h.dtype)
            self.h[layer][:, :, i, j], self.c[layer][:, :, i, j] = h, c
            feats = feats + h
        return m.head(feats)
