"""An autoencoder whose latent is a small spatial grid: the first stage of latent diffusion (Rombach et al. 2022).

x (B, C, S, S) -> z (B, c, s, s) -> x_hat, with s = S / 2^downsamples: 28x28 digits become a 4 x 7 x 7 grid
(196 numbers, a quarter of the pixels) that a diffusion model can denoise far faster than the pixels. The
encoder and decoder are ``nn.spatial``'s (shared with the VQ-VAE). Two kinds of latent (``regularization``):

- ``kl`` (default, the latent-diffusion recipe, Rombach et al. sec. 3 and appendix G): the encoder predicts a
  diagonal Gaussian q(z|x) = N(mu, diag(exp(logvar))) per grid cell, a latent is drawn by the reparameterisation
  trick, and KL(q(z|x) || N(0, I)) is added with a very small weight (``kl_weight``, theirs 1e-6 against a
  per-image reconstruction sum). The weight keeps the latent space from drifting to arbitrary scales and makes
  the decoder robust to small perturbations of z, without the VAE's blur: the posterior stays narrow and the
  latents are nowhere near N(0, I), which is why latent diffusion rescales them (``latent_diffusion.py``).
- ``none``: deterministic, z = enc(x).

The latent interface latent diffusion reads (the VQ-VAE gives the same names): ``latent_shape`` (c, s, s),
``encode_latent(x)`` (deterministic: the posterior mean), ``decode_latent(z)`` (images in [0, 1]) and
``reconstruct(x)`` = decode_latent(encode_latent(x)), which the training loop also draws as reconstruction grids
of validation images; the reconstruction error (``mse`` per pixel) is in the validation metrics.

Sampling from the autoencoder alone decodes latents drawn from a diagonal Gaussian fitted to the training
latents (running statistics, as the ``autoencoder`` family keeps): an honest baseline that shows why a prior
over the latents (latent diffusion) is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import GenaiError
from ..nn.latent import check_temperature, update_latent_stats
from ..nn.spatial import SpatialDecoder, SpatialEncoder
from ..registry import register_model
from .base import GenerativeModel, ImageSpec

DEFAULT_KL_WEIGHT = 1e-6  # Rombach et al.'s KL-regularised first stages (their kl-f4/f8 configs)
LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the predicted log-variance (latent diffusion's DiagonalGaussianDistribution)


@dataclass
class Config:
    latent_channels: int = 4  # c of the (c, s, s) latent grid
    downsamples: int = 2  # s = size / 2^downsamples (ceil): 28 -> 14 -> 7
    width: int = 64  # channels of every encoder / decoder level
    res_blocks: int = 1  # residual blocks per level
    regularization: Literal["kl", "none"] = "kl"  # kl: Gaussian posterior + kl_weight * KL; none: deterministic
    kl_weight: float | None = None  # kl: weight of KL(q(z|x) || N(0, I)) against the per-image reconstruction
    #                                 sum; None: latent diffusion's 1e-6. Refused with regularization none.
    recon: Literal["bce", "mse", "l1"] = "bce"  # reconstruction loss per pixel, summed over the image


@register_model("spatial_ae", "autoencoder to a small latent grid (KL or plain): latent diffusion's first stage")
class SpatialAutoencoder(GenerativeModel):
    Config = Config
    tiny = {"latent_channels": 2, "downsamples": 1, "width": 8}
    sample_options = frozenset({"temperature"})
    capabilities = frozenset({"encode", "reconstruct", "latent_grid"})

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if config.regularization not in ("kl", "none"):
            raise GenaiError(f"unknown model.regularization '{config.regularization}'; valid: kl, none")
        if config.recon not in ("bce", "mse", "l1"):
            raise GenaiError(f"unknown model.recon '{config.recon}'; valid: bce, mse, l1")
        kl = config.regularization == "kl"
        if not kl and config.kl_weight is not None:
            raise GenaiError("model.kl_weight applies to regularization kl only; set model.regularization=kl "
                             "or drop model.kl_weight")
        if config.kl_weight is not None and not config.kl_weight >= 0:
            raise GenaiError(f"model.kl_weight must be >= 0, got {config.kl_weight}; latent diffusion uses 1e-6")
        self.kl_weight = (DEFAULT_KL_WEIGHT if config.kl_weight is None else config.kl_weight) if kl else 0.0
        c = config.latent_channels
        # kl: the encoder's 2c output channels are (mu, logvar) of each latent cell.
        self.encoder = SpatialEncoder(spec.channels, spec.size, config.width, config.downsamples,
                                      2 * c if kl else c, config.res_blocks)
        self.decoder = SpatialDecoder(spec.channels, spec.size, config.width, config.downsamples, c,
                                      config.res_blocks)
        s = self.encoder.grid
        self.register_buffer("latent_mean", torch.zeros(c, s, s))  # (c, s, s) over the training latents
        self.register_buffer("latent_std", torch.ones(c, s, s))
        self.register_buffer("latent_batches", torch.zeros((), dtype=torch.long))

    # -- the latent interface (latent diffusion reads these; the VQ-VAE gives the same names) ---------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(c, s, s) of one latent grid."""
        return (self.config.latent_channels, self.encoder.grid, self.encoder.grid)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (B, C, S, S) in [0, 1] -> (mu, logvar), each (B, c, s, s); logvar None when deterministic."""
        h = self.encoder(x * 2 - 1).float()
        if self.config.regularization == "none":
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def encode_latent(self, x: Tensor) -> Tensor:
        """Images (B, C, S, S) in [0, 1] -> latents (B, c, s, s), deterministic: the posterior mean for kl."""
        return self.posterior(x)[0]

    def decode_logits(self, z: Tensor) -> Tensor:
        """(B, c, s, s) -> (B, C, S, S) logits; images are their sigmoid."""
        return self.decoder(z).float()

    def decode_latent(self, z: Tensor) -> Tensor:
        """(B, c, s, s) -> images (B, C, S, S) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Images in [0, 1] -> their reconstructions through the posterior mean, same shape, in [0, 1]."""
        return self.decode_latent(self.encode_latent(x))

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, c*s*s): the flattened latent grid, for genai inspect's PCA of the latents."""
        return self.encode_latent(x).flatten(1)

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch):
        """Per image: sum of the pixels' reconstruction loss + kl_weight * KL (Rombach et al., appendix G), reported
        per pixel (divided by C*S*S) so that the loss reads like the other autoencoders'."""
        x, _ = batch
        mu, logvar = self.posterior(x)  # (B, c, s, s)
        if logvar is None:
            z = mu
            kl = torch.zeros((), device=x.device)
        else:
            z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # reparameterisation (Kingma & Welling eq. 10)
            # KL(N(mu, sigma^2) || N(0, 1)) summed over the grid, mean over the batch (Kingma & Welling appendix B).
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        logits = self.decode_logits(z)  # (B, C, S, S)
        x_hat = torch.sigmoid(logits)
        if self.config.recon == "bce":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        elif self.config.recon == "mse":
            recon = (x_hat - x) ** 2
        else:
            recon = (x_hat - x).abs()
        recon = recon.flatten(1).sum(1).mean()  # per image
        dims = self.spec.dims
        if self.training:
            update_latent_stats(self, mu.detach())
        return {"loss": (recon + self.kl_weight * kl) / dims, "recon": recon.detach() / dims,
                "mse": F.mse_loss(x_hat, x).detach(), "kl": kl.detach()}

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """Decode latents from the diagonal Gaussian fitted to the training latents (``temperature`` scales its std).
        Cells are drawn independently, so the digits come out broken: the gap latent diffusion fills."""
        t = check_temperature(temperature)
        eps = torch.randn((n, *self.latent_mean.shape), generator=generator, device=self.latent_mean.device)
        return self.decode_latent(self.latent_mean + t * self.latent_std * eps)
