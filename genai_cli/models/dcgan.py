"""DCGAN (Radford, Metz & Chintala 2016), with minibatch discrimination (Salimans et al. 2016) as an option.

A generator G maps noise z ~ N(0, I) to an image; a discriminator D maps an image to a logit, the log-odds
that it is real. They play the game of Goodfellow et al. 2014, eq. 1:

    min_G max_D  E_x[log D(x)] + E_z[log(1 - D(G(z)))].

D ascends it. For G, ``gan_loss: minimax`` descends E_z[log(1 - D(G(z)))] as written, whose gradient vanishes
when D confidently rejects the fakes (early in training); the default ``non_saturating`` loss instead
maximises E_z[log D(G(z))] (Goodfellow et al. 2014, sec. 3), the same fixed point with strong early gradients.
With logits l, log D = -softplus(-l) and log(1 - D) = -softplus(l), which are stable under bf16 autocast.

``minibatch`` lets D see the whole batch, so a batch of near-identical fakes (mode collapse) is easy to
reject: ``features`` is Salimans et al.'s minibatch discrimination layer, ``stddev`` the lighter minibatch
standard deviation of Karras et al. 2018. Real and fake images always go through D in separate batches, so
these statistics never mix the two; for the same reason D's batch norm keeps no running statistics (it
normalises by the batch at hand in eval mode too), so D(x) and D(G(z)) in validation mean what they mean in
training.

Training overrides ``configure_optimizers`` and ``train_step`` (one Adam per network, ``d_steps`` D steps then
``g_steps`` G steps, one each by default); the generic loop knows nothing of this. The balance of the two players is
what the failures of GAN training turn on: a D trained ahead of G (``d_steps`` > 1, Goodfellow et al.'s k) rejects
the fakes confidently, where the minimax loss gives G no gradient; a G trained ahead of D (``g_steps`` > 1) moves
all its samples to whatever D currently scores highest, and collapses onto few modes or hops between them
(Goodfellow 2016, "NIPS tutorial", sec. 5.1.1; Metz et al. 2017). Images are scaled to [-1, 1] for D; G ends in tanh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn.conv import ConvDecoder, ConvEncoder
from ..nn.latent import check_temperature, walk_latents
from ..registry import register_model
from .base import GenerativeModel, ImageSpec, Stepper


@dataclass
class Config:
    latent_dim: int = 64
    widths: list[int] = field(default_factory=lambda: [64, 128])  # D's channels per level, high to low res; G mirrors
    norm: Literal["batch", "none"] = "batch"
    gan_loss: Literal["non_saturating", "minimax"] = "non_saturating"  # the generator's loss
    minibatch: Literal["none", "features", "stddev"] = "none"  # what D sees of the whole batch
    minibatch_kernels: int = 16  # B in Salimans et al. 3.2: extra features per image
    minibatch_kernel_dim: int = 5  # C in Salimans et al. 3.2: the dimension each kernel compares in
    d_steps: int = 1  # discriminator steps per training step (k in Goodfellow et al. 2014, algorithm 1)
    g_steps: int = 1  # generator steps per training step, after D's
    beta1: float = 0.5  # Adam betas for both networks: DCGAN's 0.5 damps the oscillation of the game
    beta2: float = 0.999


# ---------------------------------------------------------------------------------------------
# Losses on D's logits
# ---------------------------------------------------------------------------------------------
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """-(E[log D(x)] + E[log(1 - D(G(z)))]), Goodfellow et al. 2014 eq. 1 from D's side."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_loss(fake_logits: Tensor, kind: str) -> Tensor:
    """non_saturating: -E[log D(G(z))]; minimax: E[log(1 - D(G(z)))] (eq. 1 from G's side; negative)."""
    fake_logits = fake_logits.float()
    if kind == "minimax":
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()


# ---------------------------------------------------------------------------------------------
# Layers that look at the whole minibatch (appended to D's flattened features)
# ---------------------------------------------------------------------------------------------
class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016, sec. 3.2: (N, A) features -> (N, A + kernels).

    Each image's features f(x_i) are multiplied by a learned tensor T (A x B x C) into M_i (B x C); for each of
    the B kernels, c_b(x_i, x_j) = exp(-||M_i,b - M_j,b||_1), and o(x_i)_b = sum_{j != i} c_b(x_i, x_j) says how
    close x_i is to the rest of the batch. A collapsed batch gives o near N - 1 everywhere, which D learns to
    reject. (The paper's sum includes j = i, a constant 1; we leave it out.)
    """

    def __init__(self, in_features: int, kernels: int, kernel_dim: int):
        super().__init__()
        self.kernels, self.kernel_dim = kernels, kernel_dim
        # Scaled so that the L1 distances start O(1): exp(-d) then neither saturates at 0 nor sits at 1.
        self.T = nn.Parameter(torch.randn(in_features, kernels * kernel_dim) * 0.1 / math.sqrt(in_features))
        self.out_features = in_features + kernels

    def forward(self, f: Tensor) -> Tensor:
        n = f.shape[0]
        # float32 throughout: exp of bf16 distances loses the small differences this layer is about.
        with torch.autocast(f.device.type, enabled=False):
            m = (f.float() @ self.T.float()).view(n, self.kernels, self.kernel_dim)  # (N, B, C)
            dist = (m[:, None] - m[None, :]).abs().sum(-1)  # (N, N, B): ||M_i,b - M_j,b||_1
            o = torch.exp(-dist).sum(1) - 1.0  # (N, B), the j = i term exp(0) = 1 removed
        return torch.cat([f, o.to(f.dtype)], 1)  # (N, A + B)


class MinibatchStdDev(nn.Module):
    """Karras et al. 2018, sec. 3: append one feature, the standard deviation over the batch of each feature,
    averaged over features: (N, A) -> (N, A + 1). Zero for a batch of identical images."""

    def __init__(self, in_features: int):
        super().__init__()
        self.out_features = in_features + 1

    def forward(self, f: Tensor) -> Tensor:
        std = (f.float().var(0, correction=0) + 1e-8).sqrt().mean()  # a scalar for the whole batch
        return torch.cat([f, std.to(f.dtype).expand(f.shape[0], 1)], 1)


class Discriminator(nn.Module):
    """(N, C', H, W) in [-1, 1] -> (N,) logits: conv stack, optional minibatch layer, linear."""

    def __init__(self, in_channels: int, size: int, config: Config):
        super().__init__()
        self.features = ConvEncoder(in_channels, size, config.widths, config.norm, batch_stats_only=True)
        a = self.features.feature_dim
        if config.minibatch == "features":
            self.minibatch = MinibatchDiscrimination(a, config.minibatch_kernels, config.minibatch_kernel_dim)
        elif config.minibatch == "stddev":
            self.minibatch = MinibatchStdDev(a)
        else:
            self.minibatch = None
        self.head = nn.Linear(self.minibatch.out_features if self.minibatch else a, 1)

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)  # (N, A)
        if self.minibatch is not None:
            f = self.minibatch(f)  # (N, A + extra)
        return self.head(f).squeeze(1)  # (N,)


def dcgan_init(module: nn.Module) -> None:
    """Radford et al. 2016, sec. 4: weights from N(0, 0.02); batch-norm scales from N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@register_model("dcgan", "DCGAN; non-saturating or minimax loss; minibatch discrimination as an option")
class DCGAN(GenerativeModel):
    Config = Config
    tiny = {"latent_dim": 8, "widths": [8, 16], "minibatch": "features", "minibatch_kernels": 4,
            "minibatch_kernel_dim": 3}
    # No "traverse": walking between real images' latents needs an encoder, which a GAN has not.
    sample_options = frozenset({"temperature", "interpolate", "traverse_dim"})
    capabilities = frozenset({"walk", "manual_step"})
    adversarial = True

    def __init__(self, config: Config, spec: ImageSpec, *, label_dim: int = 0):
        """``label_dim`` > 0 is for the conditional subclass: the extra inputs of G (one-hot) and D (planes)."""
        super().__init__(config, spec)
        if config.latent_dim < 1:
            raise GenaiError(f"model.latent_dim must be >= 1, got {config.latent_dim}")
        if config.d_steps < 1 or config.g_steps < 1:
            raise GenaiError(f"model.d_steps and model.g_steps must be >= 1 (optimizer steps of each player per "
                             f"training step), got {config.d_steps}, {config.g_steps}")
        if config.minibatch == "features" and (config.minibatch_kernels < 1 or config.minibatch_kernel_dim < 1):
            raise GenaiError("model.minibatch_kernels and model.minibatch_kernel_dim must be >= 1 "
                             f"(got {config.minibatch_kernels}, {config.minibatch_kernel_dim})")
        self.generator = ConvDecoder(config.latent_dim + label_dim, spec.channels, spec.size, config.widths,
                                     config.norm)
        self.discriminator = Discriminator(spec.channels + label_dim, spec.size, config)
        self.generator.apply(dcgan_init)
        self.discriminator.features.apply(dcgan_init)
        self.discriminator.head.apply(dcgan_init)

    # -- the two networks (the conditional GAN overrides the two *_input hooks) -------------------------
    def generator_input(self, z: Tensor, y: Tensor) -> Tensor:
        return z  # (B, latent_dim); the unconditional G ignores labels

    def discriminator_input(self, x: Tensor, y: Tensor) -> Tensor:
        return x  # (B, C, H, W)

    def generate(self, z: Tensor, y: Tensor) -> Tensor:
        """(B, latent_dim), (B,) labels -> (B, C, H, W) fakes in [-1, 1]."""
        return torch.tanh(self.generator(self.generator_input(z, y)))

    def discriminate(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1], (B,) labels -> (B,) logits of 'real'."""
        return self.discriminator(self.discriminator_input(x, y)).float()

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch):
        """Both players' losses at once. ``loss`` = loss_d + loss_g reaches every parameter (D's loss sees
        detached fakes); the loop trains through ``train_step``, this serves validation and the tests."""
        x, y = batch
        z = torch.randn(x.shape[0], self.config.latent_dim, device=x.device)
        fake = self.generate(z, y)
        real_logits = self.discriminate(x * 2 - 1, y)
        loss_d = discriminator_loss(real_logits, self.discriminate(fake.detach(), y))
        fake_logits = self.discriminate(fake, y)
        loss_g = generator_loss(fake_logits, self.config.gan_loss)
        return {"loss": loss_d + loss_g, "loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
                "d_x": torch.sigmoid(real_logits).mean().detach(),
                "d_g_z": torch.sigmoid(fake_logits).mean().detach()}

    def configure_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        if getattr(train_cfg, "grad_accum", 1) > 1 and (self.config.d_steps > 1 or self.config.g_steps > 1):
            raise GenaiError("model.d_steps / model.g_steps > 1 take several optimizer steps per batch, which "
                             "train.grad_accum cannot split; set train.grad_accum=1")
        betas = (self.config.beta1, self.config.beta2)
        return {
            "generator": torch.optim.Adam(self.generator.parameters(), lr=train_cfg.lr, betas=betas,
                                          weight_decay=train_cfg.weight_decay),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=train_cfg.lr, betas=betas,
                                              weight_decay=train_cfg.weight_decay),
        }

    def train_step(self, batch, optimizers: dict[str, torch.optim.Optimizer], stepper: Stepper) -> dict[str, float]:
        """``d_steps`` D steps on the real batch and fakes, then ``g_steps`` G steps against the updated D (Goodfellow
        et al. 2014, algorithm 1, with k = d_steps; each D step draws fresh noise, the real batch is the one the loop
        gave). The first fakes are reused by the first G step, as in the DCGAN reference code; later G steps draw
        fresh noise. Logged: the last step of each player; grad_norm_g is the G gradient's norm before clipping."""
        x, y = batch
        opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]
        cfg = self.config

        for i in range(cfg.d_steps):
            z = torch.randn(x.shape[0], cfg.latent_dim, device=x.device)
            opt_d.zero_grad(set_to_none=True)
            with stepper.autocast():
                if i == 0:
                    fake = self.generate(z, y)  # (B, C, H, W), keeps G's graph for the first G step
                    fakes = fake.detach()
                else:
                    with torch.no_grad():
                        fakes = self.generate(z, y)
                real_logits = self.discriminate(x * 2 - 1, y)
                loss_d = discriminator_loss(real_logits, self.discriminate(fakes, y))
            stepper.backward(loss_d)
            norm_d = stepper.step(opt_d, self.discriminator.parameters())

        self.discriminator.requires_grad_(False)  # G's loss needs gradients through D, not for D
        try:
            for i in range(cfg.g_steps):
                opt_g.zero_grad(set_to_none=True)
                with stepper.autocast():
                    if i > 0:
                        fake = self.generate(torch.randn(x.shape[0], cfg.latent_dim, device=x.device), y)
                    fake_logits = self.discriminate(fake, y)
                    loss_g = generator_loss(fake_logits, cfg.gan_loss)
                stepper.backward(loss_g)
                norm_g = stepper.step(opt_g, self.generator.parameters())
        finally:
            self.discriminator.requires_grad_(True)

        loss_d, loss_g = loss_d.detach(), loss_g.detach()
        return {"loss": float(loss_d + loss_g), "loss_d": float(loss_d), "loss_g": float(loss_g),
                "d_x": float(torch.sigmoid(real_logits.detach()).mean()),
                "d_g_z": float(torch.sigmoid(fake_logits.detach()).mean()),
                "grad_norm_d": norm_d, "grad_norm_g": norm_g, "grad_norm": math.hypot(norm_d, norm_g)}

    # -- sampling -----------------------------------------------------------------------------
    def _noise(self, n: int, generator, temperature: float = 1.0) -> Tensor:
        return temperature * torch.randn(n, self.config.latent_dim, generator=generator, device=self.device)

    def _images(self, z: Tensor, y: Tensor) -> Tensor:
        return ((self.generate(z, y).float() + 1) / 2).clamp(0, 1)

    def walk_labels(self, rows: int, steps: int) -> Tensor:
        """Labels for the rows*steps points of a walk (all 0: the unconditional G ignores them)."""
        return torch.zeros(rows * steps, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """G(z) for z ~ N(0, temperature^2 I): temperature < 1 trades diversity for quality (truncation)."""
        z = self._noise(n, generator, check_temperature(temperature))
        return self._images(z, torch.zeros(n, dtype=torch.long, device=self.device))

    @torch.no_grad()
    def walk(self, rows: int, steps: int, *, generator: torch.Generator | None = None,
             images: Tensor | None = None, dim: int | None = None, temperature: float = 1.0) -> Tensor:
        """(rows * steps, C, H, W) in [0, 1]: row i walks from the noise of ``sample(2 * rows)[2i]`` to that of
        ``[2i + 1]`` (the same generator and temperature giving the same draws), or (with ``dim``) sets noise
        coordinate ``dim`` to values in [-3, 3] around the noise of ``sample(rows)[i]``. A GAN has no encoder,
        so ``images`` must be None."""
        return self._walk(rows, steps, self.walk_labels(rows, steps), generator=generator, images=images, dim=dim,
                          temperature=temperature)

    def _walk(self, rows: int, steps: int, labels: Tensor, *, generator, images, dim, temperature) -> Tensor:
        z = walk_latents(rows, steps, latent_dim=self.config.latent_dim,
                         draw=lambda k, t: self._noise(k, generator, t), images=images, dim=dim,
                         temperature=temperature, name=type(self).__name__.lower())
        return self._images(z, labels)
