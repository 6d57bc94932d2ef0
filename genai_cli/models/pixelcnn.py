"""PixelCNN: masked convolutions predict each sub-pixel from the pixels above and to the left.

Plain (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Sec. 3.5 and 3.4): a k1 x k1 mask-A
convolution, then residual blocks of mask-B convolutions, then 1x1 mask-B output layers. Its receptive
field has a blind spot: no depth lets pixel (i, j) see (i-1, j+2), up and two to the right.

Gated (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", Sec. 2.1-2.2):
two stacks remove the blind spot. The vertical stack sees the rows strictly above (a (k//2+1) x k kernel
whose first layer masks the current row); the horizontal stack sees the current row to the left (a
1 x (k//2+1) kernel) and receives the vertical stack through a 1x1 link. Both use the gated activation
    y = tanh(W_f * x) . sigmoid(W_g * x)                               (Eq. 2)
and the horizontal stack is residual (Fig. 2).

RGB: feature maps are split into three groups (R, G, B) and the masks let group g see data channels
< g at the current pixel (mask A) and feature groups <= g (mask B), so R, then G, then B are predicted.

Sampling computes one pixel through every layer per token, reading cached neighbours (``PixelStepper``),
instead of re-running the network over the whole image.
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
    channels: int = 64  # feature maps per layer (a multiple of the image channels)
    layers: int = 6  # residual blocks (plain) or gated layers after the first
    kernel: int = 3  # kernel size of the later layers (odd)
    first_kernel: int = 7  # kernel size of the plain model's mask-A first layer (odd)
    gated: bool = False  # Gated PixelCNN: vertical + horizontal stacks, no blind spot


def gate(t: Tensor) -> Tensor:
    """Gated activation, Eq. 2 of the Gated PixelCNN paper: (B, 2F, ...) -> (B, F, ...)."""
    f, g = t.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


@register_model("pixelcnn", "PixelCNN with masked convolutions; gated: true for Gated PixelCNN (no blind spot)")
class PixelCNN(AutoregressiveImageModel, GenerativeModel):
    Config = Config
    tiny = {"channels": 12, "layers": 2, "first_kernel": 3, "levels": 4}

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        c, f, k = spec.channels, config.channels, config.kernel
        if k < 1 or k % 2 == 0 or config.first_kernel < 1 or config.first_kernel % 2 == 0:
            raise GenaiError(f"model.kernel = {k} and model.first_kernel = {config.first_kernel} must be odd: "
                             "use e.g. 3 and 7")
        if config.layers < 0:
            raise GenaiError(f"model.layers = {config.layers} is negative: use 0 or more")
        data = torch.arange(c)  # data channel g belongs to group g
        feat = channel_groups(f, c, "model.channels")  # (F,)
        gates = torch.cat([feat, feat])  # both halves of a gated pre-activation follow their unit's group
        logits = torch.arange(c).repeat_interleave(self.levels)  # output c * K + level -> group c
        if config.gated:
            kv = (k // 2 + 1, k)  # vertical kernel: rows i - k//2 .. i, anchored on its bottom row
            kh = (1, k // 2 + 1)  # horizontal kernel: columns j - k//2 .. j
            self.v_convs = nn.ModuleList()
            self.h_convs = nn.ModuleList()
            self.links = nn.ModuleList()  # vertical -> horizontal, 1x1; needs no mask, v sees only rows above
            self.h_res = nn.ModuleList()
            for layer in range(config.layers + 1):
                first = layer == 0
                c_in = c if first else f
                self.v_convs.append(MaskedConv2d(c_in, 2 * f, kv, (k // 2, k // 2), "V" if first else "none"))
                self.h_convs.append(MaskedConv2d(c_in, 2 * f, kh, (0, k // 2), "A" if first else "B",
                                                 data if first else feat, gates))
                self.links.append(nn.Conv2d(2 * f, 2 * f, 1))
                self.h_res.append(MaskedConv2d(f, f, (1, 1), (0, 0), "B", feat, feat))
        else:
            k1 = config.first_kernel
            self.first = MaskedConv2d(c, f, (k1, k1), (k1 // 2, k1 // 2), "A", data, feat)
            self.convs = nn.ModuleList(MaskedConv2d(f, f, (k, k), (k // 2, k // 2), "B", feat, feat)
                                       for _ in range(config.layers))
            self.mixes = nn.ModuleList(MaskedConv2d(f, f, (1, 1), (0, 0), "B", feat, feat)
                                       for _ in range(config.layers))
        self.hidden = MaskedConv2d(f, f, (1, 1), (0, 0), "B", feat, feat)
        self.out = MaskedConv2d(f, c * self.levels, (1, 1), (0, 0), "B", feat, logits)

    # -- training forward ----------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        return tokens.to(self.out.weight.dtype) * (2.0 / (self.levels - 1)) - 1.0  # (B, T) levels -> [-1, 1]

    def logits_from_embedding(self, e: Tensor) -> Tensor:
        x = tokens_to_image(e, self.spec)  # (B, C, H, W)
        if self.config.gated:
            v, h = x, x
            for layer in range(self.config.layers + 1):
                v_pre = self.v_convs[layer](v)  # (B, 2F, H, W), from rows above only
                h_new = self.h_res[layer](gate(self.h_convs[layer](h) + self.links[layer](v_pre)))
                # No residual into the first layer: its input is the data, current pixel included.
                h = h_new if layer == 0 else h + h_new
                v = gate(v_pre)
        else:
            h = self.first(x)  # (B, F, H, W)
            for conv, mix in zip(self.convs, self.mixes, strict=True):
                h = h + mix(F.relu(conv(F.relu(h))))
        logits = self.out(F.relu(self.hidden(F.relu(h))))  # (B, C * K, H, W)
        return conv_logits_to_seq(logits, self.spec.channels, self.levels)

    # -- sampling ------------------------------------------------------------------------------------
    def incremental(self, n: int, hidden_noise: float = 0.0, generator: torch.Generator | None = None) -> TokenStepper:
        return _GatedPixels(self, n) if self.config.gated else _PlainPixels(self, n)

    def head(self, h: Tensor) -> Tensor:
        """One pixel's top features (n, F) -> logits (n, C, K)."""
        logits = self.out.pointwise(F.relu(self.hidden.pointwise(F.relu(h))))
        return logits.reshape(h.shape[0], self.spec.channels, self.levels)


class _PlainPixels(PixelStepper):
    """Per-layer padded inputs of every k x k convolution; each pixel is computed from its neighbours there."""

    def __init__(self, model: PixelCNN, n: int):
        super().__init__(model.spec)
        self.m = model
        size, like = model.spec.size, model.out.weight
        self.data = model.first.input_buffer(n, size, size, like)
        self.inputs = [conv.input_buffer(n, size, size, like) for conv in model.convs]

    def write(self, pos: int, values: Tensor) -> None:
        i, j = divmod(pos // self.spec.channels, self.spec.size)
        self.m.first.put(self.data, i, j, self.m.embed(values), channel=pos % self.spec.channels)

    def compute(self, i: int, j: int, last: bool) -> Tensor:
        m = self.m
        h = m.first.at(self.data, i, j)  # (n, F)
        for conv, mix, buf in zip(m.convs, m.mixes, self.inputs, strict=True):
            conv.put(buf, i, j, F.relu(h))
            h = h + mix.pointwise(F.relu(conv.at(buf, i, j)))
        return m.head(h)


class _GatedPixels(PixelStepper):
    """Vertical stack: a whole row at a time, when the row starts (it sees only rows above).
    Horizontal stack: one pixel at a time, from its row's cached inputs."""

    def __init__(self, model: PixelCNN, n: int):
        super().__init__(model.spec)
        self.m = model
        size, like = model.spec.size, model.out.weight
        self.v_in = [conv.input_buffer(n, size, size, like) for conv in model.v_convs]
        self.h_in = [conv.input_buffer(n, size, size, like) for conv in model.h_convs]
        self.v_pre: list[Tensor] = []  # per layer, (n, 2F, W): the current row's vertical pre-activations

    def write(self, pos: int, values: Tensor) -> None:
        i, j = divmod(pos // self.spec.channels, self.spec.size)
        value = self.m.embed(values)
        self.m.v_convs[0].put(self.v_in[0], i, j, value, channel=pos % self.spec.channels)
        self.m.h_convs[0].put(self.h_in[0], i, j, value, channel=pos % self.spec.channels)

    def start_row(self, i: int) -> None:
        m = self.m
        self.v_pre = []
        for layer, conv in enumerate(m.v_convs):
            v_pre = conv.row(self.v_in[layer], i)  # (n, 2F, W)
            self.v_pre.append(v_pre)
            if layer + 1 < len(m.v_convs):
                left, _, top, _ = m.v_convs[layer + 1].pads
                self.v_in[layer + 1][:, :, i + top, left:left + self.spec.size] = gate(v_pre)

    def compute(self, i: int, j: int, last: bool) -> Tensor:
        m = self.m
        h = None
        for layer, conv in enumerate(m.h_convs):
            if layer > 0:
                conv.put(self.h_in[layer], i, j, h)
            link = m.links[layer](self.v_pre[layer][:, :, j, None, None])[:, :, 0, 0]  # (n, 2F)
            h_new = m.h_res[layer].pointwise(gate(conv.at(self.h_in[layer], i, j) + link))
            h = h_new if layer == 0 else h + h_new
        return m.head(h)
