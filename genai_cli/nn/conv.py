"""Convolutional stacks shared by the autoencoder, the VAE, DCGAN and the conditional GAN.

``ConvEncoder`` halves the resolution at every level and flattens (the autoencoder's encoder, the GAN's
discriminator); ``ConvDecoder`` mirrors it from a vector back to an image (the decoder, the generator).
Following DCGAN (Radford, Metz & Chintala 2016, sec. 3): strided convolutions instead of pooling, batch
norm everywhere except the encoder's first layer and the decoder's output layer, LeakyReLU(0.2) in the
encoder and ReLU in the decoder.

Two departures, both so that any image size works and the samples stay smooth:
- The encoder uses 3x3 stride-2 convolutions, which give ceil(size / 2), so 28 -> 14 -> 7 -> 4 needs no
  divisibility check.
- The decoder upsamples with nearest neighbour to the exact size of the matching encoder level, then
  applies a 3x3 convolution, instead of a transposed convolution: the same capacity without the
  checkerboard artefacts of uneven kernel overlap (Odena, Dumoulin & Olah 2016, "Deconvolution and
  checkerboard artifacts").
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ..errors import GenaiError

Norm = Literal["batch", "none"]


def level_sizes(size: int, levels: int) -> list[int]:
    """Spatial size at every level: [size, ceil(size/2), ...], levels + 1 entries (28, 2 -> [28, 14, 7])."""
    sizes = [size]
    for _ in range(levels):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


def check_stack(widths: list[int], norm: str, owner: str) -> None:
    """Fail at construction, with the config key to fix, rather than deep inside a forward pass."""
    if not widths or any(int(w) < 1 for w in widths):
        raise GenaiError(f"{owner}: model.widths must list one positive channel count per level, got {widths}; "
                         "use e.g. [32, 64]")
    if norm not in ("batch", "none"):
        raise GenaiError(f"{owner}: unknown model.norm '{norm}'; valid: batch, none")


class ConvEncoder(nn.Module):
    """(B, in_channels, size, size) -> (B, feature_dim): one stride-2 conv per entry of ``widths``, flattened.

    ``batch_stats_only``: batch norm always uses the statistics of the batch at hand, in eval mode too, and
    keeps no running averages. A GAN discriminator wants this: it sees real and fake images in separate
    batches, so running averages would mix the two and make its eval-mode outputs meaningless.
    """

    def __init__(self, in_channels: int, size: int, widths: list[int], norm: Norm = "batch",
                 batch_stats_only: bool = False):
        super().__init__()
        check_stack(widths, norm, "encoder")
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            use_norm = norm == "batch" and i > 0  # DCGAN: no batch norm on the layer that sees the pixels
            # A bias before batch norm is cancelled by its mean subtraction: leave it out.
            layers.append(nn.Conv2d(c, w, 3, stride=2, padding=1, bias=not use_norm))
            if use_norm:
                layers.append(nn.BatchNorm2d(w, track_running_stats=not batch_stats_only))
            layers.append(nn.LeakyReLU(0.2))
            c = w
        self.net = nn.Sequential(*layers)
        self.out_size = level_sizes(size, len(widths))[-1]
        self.feature_dim = widths[-1] * self.out_size**2

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).flatten(1)  # (B, widths[-1] * s * s)


class ConvDecoder(nn.Module):
    """(B, in_dim) -> (B, out_channels, size, size), unbounded (logits or pre-tanh): the encoder mirrored."""

    def __init__(self, in_dim: int, out_channels: int, size: int, widths: list[int], norm: Norm = "batch"):
        super().__init__()
        check_stack(widths, norm, "decoder")
        sizes = level_sizes(size, len(widths))  # e.g. [28, 14, 7]
        use_norm = norm == "batch"
        self.start_shape = (widths[-1], sizes[-1], sizes[-1])  # the encoder's last feature map
        c0, s0, _ = self.start_shape
        self.project = nn.Linear(in_dim, c0 * s0 * s0, bias=not use_norm)
        self.project_act = nn.Sequential(nn.BatchNorm2d(c0) if use_norm else nn.Identity(), nn.ReLU())
        channels = list(reversed(widths)) + [out_channels]  # e.g. [64, 32, 1]
        targets = list(reversed(sizes[:-1]))  # e.g. [14, 28]
        layers: list[nn.Module] = []
        for i, target in enumerate(targets):
            last = i == len(targets) - 1
            layers.append(nn.Upsample(size=(target, target), mode="nearest"))
            layers.append(nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=last or not use_norm))
            if not last:
                if use_norm:
                    layers.append(nn.BatchNorm2d(channels[i + 1]))
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], *self.start_shape)  # (B, widths[-1], s, s)
        return self.net(self.project_act(h))  # (B, out_channels, size, size)
