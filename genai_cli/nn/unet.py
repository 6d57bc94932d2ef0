"""A small UNet for noise prediction (Ho et al. 2020, appendix B; Ronneberger et al. 2015).

The layout follows the DDPM network, scaled down so it trains on a CPU:

    conv_in -> [ResBlock x num_res_blocks (+ attention) -> Downsample] per level
            -> ResBlock, Attention, ResBlock  (bottleneck, always attended)
            -> [ResBlock x (num_res_blocks + 1), each fed one skip (+ attention) -> Upsample] per level
            -> GroupNorm, SiLU, conv_out

Every block is conditioned on a time embedding (sinusoidal features of t through an MLP), to which a
class embedding is added when ``num_classes > 0``. The class table has ``num_classes + 1`` rows: the last
row means "no label", so one network learns both p(x|y) and p(x) for classifier-free guidance.

Speed on CPU: the network works in whatever memory format its input and weights have, and is written
so that channels_last stays channels_last end to end (attention reads (B, H*W, C) tokens, which are
a view of a channels_last tensor), and so that bf16 autocast runs every conv and matmul in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..hardware import attention


def norm_groups(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """The largest group count <= max_groups that divides ``channels`` with >= min_group_size channels per group.

    DDPM's 32 groups assume >= 128 channels. At our widths (32, 64) 32 groups would normalise every channel
    on its own (InstanceNorm), erasing each feature map's mean, i.e. the image's overall brightness: on
    MNIST that left grey, blotchy backgrounds and a 3x higher loss at t ~ 950 after 780 steps, where
    >= 4 channels per group gave clean digits. 128 channels and up still get DDPM's 32 groups.
    """
    cap = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the (integer) timestep, as the Transformer's positions (Vaswani et al. sec. 3.5).

    t: (B,) -> (B, dim), computed in fp32 so that large t keeps its precision under autocast.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add the time embedding; GroupNorm, SiLU, dropout, conv; plus a (1x1) skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = h + self.emb(emb)[:, :, None, None]  # the time (+ class) embedding, broadcast over pixels
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        if channels % self.heads:
            self.heads = 1
        self.norm = group_norm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, H*W, C): a view when x is channels_last, one copy otherwise.
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v)  # (B, heads, H*W, head_dim)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))  # (B, H*W, C)
        # Back to (B, C, H, W) with the strides of x, so channels_last inputs stay channels_last.
        return x + out.transpose(1, 2).reshape(b, c, h, w).contiguous(memory_format=_format_of(x))


def _format_of(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv (learned, as in DDPM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour then a conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # Nearest-neighbour 2x as a broadcast view and one copy: the same values as F.interpolate(mode="nearest"),
        # 4x faster on the CPU at 14x14 -> 28x28 (its kernel spent ~10 % of a sampling step there).
        b, c, h, w = x.shape
        up = x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)
        return self.conv(up.contiguous(memory_format=_format_of(x)))


class UNet(nn.Module):
    """eps_theta(x_t, t[, y]): maps a noisy image and its timestep to an image-shaped output.

    channel_mults[i] * base_channels is the width at level i; level i works at size / 2**i.
    attention_levels lists extra levels (0 = full resolution) that get self-attention after each
    ResBlock; the bottleneck always has it. num_classes > 0 adds a class embedding (row num_classes
    is the null label used for classifier-free guidance).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: list[int] | None = None,
                 num_res_blocks: int = 1, attention_levels: list[int] | None = None, dropout: float = 0.0,
                 num_classes: int = 0):
        super().__init__()
        channel_mults = list(channel_mults) if channel_mults is not None else [1, 2, 2]
        attention_levels = list(attention_levels) if attention_levels is not None else []
        if not channel_mults or any(m < 1 for m in channel_mults):
            raise GenaiError(f"channel_mults must be a non-empty list of positive integers, got {channel_mults}; "
                             "use e.g. [1, 2, 2]")
        if base_channels < 1 or num_res_blocks < 1:
            raise GenaiError(f"base_channels ({base_channels}) and num_res_blocks ({num_res_blocks}) must be >= 1")
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mults)]
        if bad:
            raise GenaiError(f"attention_levels {bad} out of range: levels are 0..{len(channel_mults) - 1} "
                             f"(one per entry of channel_mults {channel_mults})")
        if not 0.0 <= dropout < 1.0:
            raise GenaiError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.num_levels = len(channel_mults)
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.channel_mults = channel_mults
        self.num_res_blocks = num_res_blocks

        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # num_classes + 1 rows: the last is the "no label" row (classifier-free guidance, Ho & Salimans 2022).
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path. skip_chs records the width of every tensor pushed for a skip connection.
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, out_ch, emb_dim, dropout)])
                if level in attention_levels:
                    block.append(Attention(out_ch))
                self.down.append(block)
                ch = out_ch
                skip_chs.append(ch)
            if level != self.num_levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = Attention(ch)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        # Up path: one more ResBlock per level than on the way down, so every skip is consumed.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            out_ch = base_channels * mult
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skip_chs.pop(), out_ch, emb_dim, dropout)])
                if level in attention_levels:
                    block.append(Attention(out_ch))
                self.up.append(block)
                ch = out_ch
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Image sides must be a multiple of this: each level but the last halves them."""
        return 2 ** (self.num_levels - 1)

    def check_image_size(self, size: int) -> None:
        """Raise GenaiError unless a size x size image survives every halving exactly."""
        m = self.size_multiple
        if size % m == 0 and size > 0:
            return
        lower, upper = (size // m) * m, (size // m + 1) * m
        nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise GenaiError(f"image size {size} is not divisible by {m} (the UNet halves it {self.num_levels - 1} "
                         f"times, once per channel_mults entry after the first); resize the data to {nearest}, "
                         f"or use fewer channel_mults levels")

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C, H, W), t (B,) integer timesteps, y (B,) labels in 0..num_classes (num_classes = no label)."""
        for side in x.shape[-2:]:
            self.check_image_size(int(side))
        emb = self.time_mlp(timestep_embedding(t, self.base_channels))  # (B, 4*base)
        if self.class_emb is not None:
            if y is None:  # no label given: the null row, i.e. the unconditional model
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y)
        elif y is not None:
            raise GenaiError("this UNet has no class conditioning (num_classes=0) but labels were given; "
                             "build it with num_classes > 0")

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for block in self.up:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, skips.pop()], dim=1), emb)  # (B, ch + skip_ch, H, W)
                else:
                    h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
