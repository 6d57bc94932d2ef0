"""Masked convolutions for raster-order models (PixelCNN, Gated PixelCNN, PixelRNN's Row LSTM).

A kernel of size (kh, kw) writes its output at the kernel cell ``anchor`` = (ah, aw): the input is
padded by ah rows on top, kh-1-ah below, aw columns left and kw-1-aw right, so output (i, j) reads
input rows i-ah .. i+kh-1-ah and columns j-aw .. j+kw-1-aw. The mask then removes what (i, j) may not
see (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Sec. 3.4, Fig. 4):

  "A"     rows above; the anchor row left of the anchor; at the anchor, only earlier channel groups.
          For the first layer, which sees the data itself.
  "B"     as "A", but the anchor also sees its own channel group. For every later layer.
  "V"     rows strictly above the anchor only (the first layer of Gated PixelCNN's vertical stack).
  "none"  the whole kernel (later vertical-stack layers, whose input already depends on rows above only).

Channel groups carry the RGB order: feature channels are split into C groups (red, green, blue), so
group g at pixel (i, j) may depend on data channels < g there. ``channel_groups`` assigns them.

Besides ``forward`` (the whole image at once, for training), a layer can compute one output pixel
(``at``) or one output row (``row``) from an already padded input: incremental sampling computes only
the pixel being sampled instead of the whole image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from . import weights_key

MaskType = Literal["A", "B", "V", "none"]


def channel_groups(num_channels: int, groups: int, what: str = "channels") -> Tensor:
    """Group index of each of ``num_channels`` features split into ``groups`` contiguous blocks."""
    if num_channels % groups:
        raise GenaiError(f"{what} = {num_channels} must be divisible by the {groups} image channels "
                         f"(one block per colour): use a multiple of {groups}")
    return torch.arange(num_channels) // (num_channels // groups)


def build_mask(in_groups: Tensor, out_groups: Tensor, kernel: tuple[int, int], anchor: tuple[int, int],
               mask_type: MaskType) -> Tensor:
    """The (out, in, kh, kw) 0/1 mask described in the module docstring."""
    kh, kw = kernel
    ah, aw = anchor
    mask = torch.zeros(len(out_groups), len(in_groups), kh, kw)
    if mask_type == "none":
        return mask.fill_(1.0)
    mask[:, :, :ah, :] = 1.0  # rows above the anchor are entirely in the past
    if mask_type == "V":
        return mask
    mask[:, :, ah, :aw] = 1.0  # same row, columns to the left
    if mask_type == "A":
        mask[:, :, ah, aw] = (out_groups[:, None] > in_groups[None, :]).float()
    else:
        mask[:, :, ah, aw] = (out_groups[:, None] >= in_groups[None, :]).float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A Conv2d whose weight is multiplied by a fixed causal mask, with explicit anchor padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], anchor: tuple[int, int],
                 mask_type: MaskType, in_groups: Tensor | None = None, out_groups: Tensor | None = None,
                 bias: bool = True):
        super().__init__(in_channels, out_channels, kernel, padding=0, bias=bias)
        kh, kw = kernel
        ah, aw = anchor
        in_groups = torch.zeros(in_channels, dtype=torch.long) if in_groups is None else in_groups
        out_groups = torch.zeros(out_channels, dtype=torch.long) if out_groups is None else out_groups
        self.pads = (aw, kw - 1 - aw, ah, kh - 1 - ah)  # F.pad order: left, right, top, bottom
        # Derived from the config, so not saved in checkpoints.
        self.register_buffer("mask", build_mask(in_groups, out_groups, kernel, anchor, mask_type), persistent=False)
        self._flat: tuple[tuple, Tensor] | None = None  # (weight identity, masked weight as (out, in * kh * kw))

    def masked_weight(self) -> Tensor:
        return self.weight * self.mask

    def pad(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H + kh - 1, W + kw - 1), zeros around."""
        return F.pad(x, self.pads)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.masked_weight(), self.bias)

    def input_buffer(self, n: int, height: int, width: int, like: Tensor) -> Tensor:
        """A zero padded input (n, in, height + kh - 1, width + kw - 1), filled in pixel by pixel when sampling."""
        return self.pad(like.new_zeros(n, self.in_channels, height, width))

    def put(self, padded: Tensor, i: int, j: int, value: Tensor, channel: int | None = None) -> None:
        """Store input pixel (i, j) (n, in), or one channel of it (n,), in the padded buffer."""
        left, _, top, _ = self.pads
        if channel is None:
            padded[:, :, i + top, j + left] = value
        else:
            padded[:, channel, i + top, j + left] = value

    def flat_weight(self) -> Tensor:
        """The masked weight as a matrix (out, in * kh * kw), kept under no_grad while the weight is unchanged.

        Sampling calls ``at`` once per layer per token; re-masking the weight each time would cost as
        much as the product itself. The key changes whenever the weight is updated in place or moved.
        """
        if torch.is_grad_enabled():
            return self.masked_weight().reshape(self.out_channels, -1)
        key = weights_key([self.weight])
        if self._flat is None or self._flat[0] != key:
            self._flat = (key, self.masked_weight().reshape(self.out_channels, -1))
        return self._flat[1]

    def at(self, padded: Tensor, i: int, j: int) -> Tensor:
        """Output pixel (i, j), (B, out), from the padded input (B, in, H + kh - 1, W + kw - 1)."""
        kh, kw = self.kernel_size
        patch = padded[:, :, i:i + kh, j:j + kw]  # (B, in, kh, kw)
        return F.linear(patch.reshape(patch.shape[0], -1), self.flat_weight(), self.bias)

    def pointwise(self, v: Tensor) -> Tensor:
        """A 1x1 layer applied to one pixel's features: (n, in) -> (n, out)."""
        return self.at(v[:, :, None, None], 0, 0)

    def row(self, padded: Tensor, i: int) -> Tensor:
        """Output row i, (B, out, W), from the padded input."""
        kh = self.kernel_size[0]
        return F.conv2d(padded[:, :, i:i + kh], self.masked_weight(), self.bias)[:, :, 0]
