"""A deterministic convolutional autoencoder: x -> z = enc(x) -> x_hat = dec(z), trained on reconstruction.

It is not a generative model by itself (nothing makes the latents fill a known distribution), which is
the point it makes next to the VAE: its latent space has holes. So that ``sample`` and ``walk`` still do
something honest, the model keeps running statistics (per-dimension mean and standard deviation) of the
training latents and draws from the Gaussian they describe; samples from it look worse than the VAE's,
and interpolations between real images' latents (``walk(images=...)``) look better than samples.

Images enter the encoder scaled to [-1, 1]; the decoder's output goes through a sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn.conv import ConvDecoder, ConvEncoder
from ..nn.latent import check_temperature, update_latent_stats, walk_latents
from ..registry import register_model
from .base import GenerativeModel, ImageSpec


@dataclass
class Config:
    latent_dim: int = 16
    widths: list[int] = field(default_factory=lambda: [32, 64])  # channels per stride-2 level, high to low res
    norm: Literal["batch", "none"] = "batch"
    recon: Literal["bce", "mse", "l1"] = "bce"  # per-pixel reconstruction loss, averaged over pixels


@register_model("autoencoder", "convolutional autoencoder; latent walks and a PCA of the latent space")
class Autoencoder(GenerativeModel):
    Config = Config
    tiny = {"latent_dim": 4, "widths": [8, 16]}
    sample_options = frozenset({"temperature", "interpolate", "traverse", "traverse_dim"})
    capabilities = frozenset({"encode", "walk"})

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if config.latent_dim < 1:
            raise GenaiError(f"model.latent_dim must be >= 1, got {config.latent_dim}")
        self.encoder = ConvEncoder(spec.channels, spec.size, config.widths, config.norm)
        self.to_latent = nn.Linear(self.encoder.feature_dim, config.latent_dim)
        self.decoder = ConvDecoder(config.latent_dim, spec.channels, spec.size, config.widths, config.norm)
        d = config.latent_dim
        self.register_buffer("latent_mean", torch.zeros(d))  # (D,) over the training latents
        self.register_buffer("latent_std", torch.ones(d))  # (D,)
        self.register_buffer("latent_batches", torch.zeros((), dtype=torch.long))

    # -- the two halves -----------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, latent_dim) float32."""
        return self.to_latent(self.encoder(x * 2 - 1)).float()

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, C, H, W) logits; images are their sigmoid."""
        return self.decoder(z).float()

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch):
        x, _ = batch
        z = self.encode(x)  # (B, D)
        logits = self.decode(z)  # (B, C, H, W)
        x_hat = torch.sigmoid(logits)
        mse = F.mse_loss(x_hat, x)
        if self.config.recon == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, x)
        elif self.config.recon == "mse":
            loss = mse
        else:
            loss = F.l1_loss(x_hat, x)
        if self.training:
            update_latent_stats(self, z.detach())
        return {"loss": loss, "mse": mse.detach()}

    # -- sampling -----------------------------------------------------------------------------
    def _random_latents(self, n: int, generator, temperature: float = 1.0) -> Tensor:
        eps = torch.randn(n, self.config.latent_dim, generator=generator, device=self.latent_mean.device)
        return self.latent_mean + temperature * self.latent_std * eps  # (n, D), the Gaussian fitted to the data

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """Decode latents drawn from a Gaussian fitted to the training latents; ``temperature`` scales its std."""
        z = self._random_latents(n, generator, check_temperature(temperature))
        return torch.sigmoid(self.decode(z))

    @torch.no_grad()
    def walk(self, rows: int, steps: int, *, generator: torch.Generator | None = None,
             images: Tensor | None = None, dim: int | None = None, temperature: float = 1.0) -> Tensor:
        """(rows * steps, C, H, W) in [0, 1]. Row i goes from the latent of images[2i] to that of images[2i+1]
        (with images None: from the latent of ``sample(2 * rows)[2i]`` to that of ``[2i + 1]``, the same
        generator and temperature giving the same draws); with ``dim``, row i instead starts at the latent of
        images[i] (or of ``sample(rows)[i]``) and varies latent dimension ``dim`` over the training latents'
        mean +- 3 std. See ``genai_cli.nn.latent``."""
        z = walk_latents(rows, steps, latent_dim=self.config.latent_dim,
                         draw=lambda k, t: self._random_latents(k, generator, t),
                         encode=lambda x: self.encode(x.to(self.latent_mean.device)), images=images, dim=dim,
                         temperature=temperature, mean=self.latent_mean, std=self.latent_std, name="autoencoder")
        return torch.sigmoid(self.decode(z))
