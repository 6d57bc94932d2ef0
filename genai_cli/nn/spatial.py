"""An encoder to a small spatial grid of latents and the decoder back, shared by the families whose latent is
a feature map rather than a vector: the VQ-VAE (its grid becomes tokens) and the spatial autoencoder that
latent diffusion denoises in.

    SpatialEncoder: (B, C, S, S) -> (B, latent_channels, s, s), s = S / 2^downsamples (28 -> 14 -> 7)
    SpatialDecoder: (B, latent_channels, s, s) -> (B, C, S, S) logits

The layout is the one of VQ-VAE (van den Oord et al. 2017, sec. 4.1: strided convolutions down, residual
3x3/1x1 blocks, the mirror image up) and of latent diffusion's first stage (Rombach et al. 2022), scaled to
CPU widths: GroupNorm (the UNet's ``group_norm``) and SiLU in the residual blocks, stride-2 3x3 convolutions
(ceil(size / 2), so 28 -> 14 -> 7 needs no divisibility check), and nearest-neighbour upsampling to the exact
size of the matching encoder level followed by a 3x3 convolution (no checkerboard artefacts).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from .conv import level_sizes
from .unet import group_norm


class Residual(nn.Module):
    """x + conv1x1(SiLU(GN(conv3x3(SiLU(GN(x)))))): VQ-VAE's residual block, pre-normalised."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


def check_spatial(width: int, downsamples: int, latent_channels: int, size: int, owner: str) -> None:
    if width < 1 or latent_channels < 1:
        raise GenaiError(f"{owner}: model.width and model.latent_channels must be >= 1, got {width} and "
                         f"{latent_channels}")
    if not 1 <= downsamples <= 4 or level_sizes(size, downsamples)[-1] < 2:
        raise GenaiError(f"{owner}: model.downsamples = {downsamples} does not fit {size}x{size} images; use 1 to 4 "
                         f"with a grid of at least 2x2 (2 gives 7x7 for 28x28)")


class SpatialEncoder(nn.Module):
    """(B, in_channels, size, size) in [-1, 1] -> (B, latent_channels, s, s), unbounded."""

    def __init__(self, in_channels: int, size: int, width: int, downsamples: int, latent_channels: int,
                 res_blocks: int = 1):
        super().__init__()
        check_spatial(width, downsamples, latent_channels, size, "encoder")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
        for _ in range(downsamples):
            layers += [*(Residual(width) for _ in range(res_blocks)), nn.Conv2d(width, width, 3, stride=2, padding=1)]
        layers += [*(Residual(width) for _ in range(res_blocks)), group_norm(width), nn.SiLU(),
                   nn.Conv2d(width, latent_channels, 1)]
        self.net = nn.Sequential(*layers)
        self.grid = level_sizes(size, downsamples)[-1]  # s

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SpatialDecoder(nn.Module):
    """(B, latent_channels, s, s) -> (B, out_channels, size, size) logits: the encoder mirrored."""

    def __init__(self, out_channels: int, size: int, width: int, downsamples: int, latent_channels: int,
                 res_blocks: int = 1):
        super().__init__()
        check_spatial(width, downsamples, latent_channels, size, "decoder")
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.targets = list(reversed(level_sizes(size, downsamples)[:-1]))  # e.g. [14, 28]
        self.blocks = nn.ModuleList(nn.Sequential(*(Residual(width) for _ in range(res_blocks)))
                                    for _ in self.targets)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in self.targets)
        self.out = nn.Sequential(*(Residual(width) for _ in range(res_blocks)), group_norm(width), nn.SiLU(),
                                 nn.Conv2d(width, out_channels, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block, conv, target in zip(self.blocks, self.convs, self.targets, strict=True):
            h = conv(F.interpolate(block(h), size=(target, target), mode="nearest"))
        return self.out(h)
