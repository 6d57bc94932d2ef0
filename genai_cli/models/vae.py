"""The variational autoencoder (Kingma & Welling 2014), with two remedies for posterior collapse.

The encoder predicts a diagonal Gaussian posterior q(z|x) = N(mu(x), diag(exp(logvar(x)))); a latent is
drawn by the reparameterisation trick, z = mu + sigma * eps, so gradients flow into mu and logvar; the
decoder gives p(x|z). Training minimises the negative ELBO,

    -ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)),

with the KL weighted by beta (beta-VAE, Higgins et al. 2017). Posterior collapse (q(z|x) = p(z) in some or
all dimensions, the decoder ignoring z) has two remedies here, both config options:
- KL annealing (Bowman et al. 2016): beta rises linearly from 0 to its target over ``kl_warmup_steps``, so the
  decoder learns to use z before the KL pushes q towards the prior.
- Free bits (Kingma et al. 2016, the IAF paper's free-bits objective): each latent dimension's KL, averaged
  over the batch, is floored at ``free_bits`` nats in the objective, so a dimension gains nothing by going
  below the floor.

Posterior collapse, shown: ``autoregressive: L`` makes the decoder a PixelCNN over the pixels (a mask-A layer and
L mask-B residual layers, van den Oord et al. 2016, sec. 3.4-3.5) to which every layer adds a map of z, as in
PixelVAE (Gulrajani et al. 2017) and the VLAE (Chen et al. 2017). Such a decoder can model the digits from the
pixels above and to the left alone, and the KL term then drives q(z|x) to the prior: no active units (Bowman et al.
2016, Chen et al. 2017 sec. 2). Binary pixels only (the decoder is Bernoulli); sampling draws pixel by pixel.

The decoder is Bernoulli (logits), Gaussian, or Laplace (an L1 reconstruction error, up to scale); the last two
have one scale shared by all pixels, learned (Rybkin et al. 2021, sigma-VAE) or fixed by ``scale``. Every
reported likelihood is a probability of the pixels as stored, so its bits/dim bound the same quantity as the
autoregressive families' and the DDPM's:
- Gaussian and Laplace are discretised into the 256 bins of 8-bit grey levels (bin k/255 covers +-1/510, the
  end bins reach out to -inf and +inf, as the DDPM bound's L_0 in Ho et al. 2020, eq. 13, and the discretised
  logistic of Salimans et al. 2017): p(x|z) is the mass of the bin x falls in, the 256 masses sum to 1, and
  the ELBO bounds the probability of the 8-bit image. They are trained on that same discretised likelihood.
- Bernoulli is a distribution over {0, 1}: on binary data (``data.binarize``) the ELBO bounds the probability
  of the binary image. On grey levels the binary cross-entropy is no likelihood (the Bernoulli "density" does
  not normalise over [0, 1], Loaiza-Ganem & Cunningham 2019): the model still trains on it, but reports it as
  the reconstruction error ``recon`` only, with no ELBO, IWAE bound or bits/dim (``log_likelihood`` is None).

Diagnostics: KL per latent dimension and the number of active units (Burda et al. 2016, sec. 5.2: dimension
u is active when Var_x(E_q[z_u | x]) > 0.01), plus the importance-weighted bound (IWAE, Burda et al. 2016,
eq. 8), a tighter lower bound on log p(x) than the ELBO for k > 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capabilities import has
from ..errors import GenaiError
from ..nn.conv import ConvDecoder, ConvEncoder
from ..nn.discretized import discretized_log_prob
from ..nn.latent import check_temperature, walk_latents
from ..nn.masked_conv import MaskedConv2d, channel_groups
from ..registry import register_model
from .base import GenerativeModel, ImageSpec

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. 2016, sec. 5.2
IWAE_CHUNK_IMAGES = 2048  # images decoded at once when estimating the IWAE bound


@dataclass
class Config:
    latent_dim: int = 16
    widths: list[int] = field(default_factory=lambda: [32, 64])  # channels per stride-2 level, high to low res
    norm: Literal["batch", "none"] = "batch"
    # bernoulli: binary pixels (on grey levels a reconstruction error, no likelihood); gaussian, l1 (Laplace):
    # distributions over the 256 grey levels
    decoder: Literal["bernoulli", "gaussian", "l1"] = "bernoulli"
    scale: float | None = None  # std (gaussian) / scale (l1) of the decoder; None learns one shared value
    beta: float = 1.0  # weight of the KL term once warmed up
    kl_warmup_steps: int = 0  # KL annealing: beta grows linearly from 0 over this many steps (0: off)
    free_bits: float = 0.0  # floor on each latent dimension's batch-mean KL, in nats (0: off)
    iwae_k: int = 64  # importance samples for the IWAE bound in validation metrics
    autoregressive: int = 0  # > 0: a PixelCNN decoder with this many mask-B layers, conditioned on z (binary data)
    autoregressive_channels: int = 32  # its feature maps per layer (a multiple of the image channels)


# ---------------------------------------------------------------------------------------------
# The pieces of the objective, as plain functions so the tests can check each against its definition
# ---------------------------------------------------------------------------------------------
def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, (B, D) -> (B, D), in nats.

    Kingma & Welling 2014, eq. 10 (derived in their appendix B): -KL = 1/2 (1 + log sigma^2 - mu^2 - sigma^2).
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def free_bits_kl(kl: Tensor, floor: float) -> Tensor:
    """(B, D) per-image, per-dimension KL -> (D,) batch-mean KL per dimension, floored at ``floor`` nats.

    Kingma et al. 2016 (IAF), free bits: sum_j max(lambda, E_x[KL_j]). Below the floor the term is constant, so
    its gradient is zero: the objective stops pushing that dimension towards the prior.
    """
    per_dim = kl.mean(0)  # (D,)
    return per_dim.clamp(min=floor) if floor > 0 else per_dim


def kl_beta(step: int, target: float, warmup_steps: int) -> float:
    """KL annealing: 0 at step 0, rising linearly to ``target`` at ``warmup_steps`` and staying there."""
    if warmup_steps <= 0:
        return float(target)
    return float(target) * min(1.0, step / warmup_steps)


# ---------------------------------------------------------------------------------------------
# The autoregressive decoder: strong enough to ignore z
# ---------------------------------------------------------------------------------------------
class PixelDecoder(nn.Module):
    """p(x | z) = prod_i p(x_i | x_<i, z), Bernoulli logits (B, C, H, W) for binary x (B, C, H, W).

    PixelCNN (van den Oord et al. 2016, sec. 3.4-3.5): a 7x7 mask-A convolution of x, then ``layers`` residual
    3x3 mask-B convolutions, then a 1x1 mask-B output. z enters as a (B, F, H, W) map added at every layer, made by
    the plain VAE's decoder (PixelVAE, Gulrajani et al. 2017, sec. 3): the map costs nothing causally, since z is
    known before the first pixel. Sampling computes one pixel through every layer at a time (``MaskedConv2d.at``).
    """

    def __init__(self, latent_dim: int, spec: ImageSpec, widths: list[int], norm: str, channels: int, layers: int):
        super().__init__()
        c, f = spec.channels, channels
        data = torch.arange(c)  # data channel g is group g: RGB predicted in order within a pixel
        feat = channel_groups(f, c, "model.autoregressive_channels")  # (F,)
        self.layers = layers
        self.condition = ConvDecoder(latent_dim, f * (layers + 1), spec.size, widths, norm)  # one map per layer
        self.first = MaskedConv2d(c, f, (7, 7), (3, 3), "A", data, feat)
        self.convs = nn.ModuleList(MaskedConv2d(f, f, (3, 3), (1, 1), "B", feat, feat) for _ in range(layers))
        self.out = MaskedConv2d(f, c, (1, 1), (0, 0), "B", feat, data)

    def maps(self, z: Tensor) -> tuple[Tensor, ...]:
        """(B, D) -> layers + 1 maps (B, F, H, W), one per layer."""
        return self.condition(z).chunk(self.layers + 1, dim=1)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Teacher forcing: every pixel's logit from the true pixels before it and z. (B, C, H, W) logits."""
        cond = self.maps(z)
        h = self.first(x * 2 - 1) + cond[0]  # (B, F, H, W)
        for conv, c in zip(self.convs, cond[1:], strict=True):
            h = h + conv(F.relu(h)) + c
        return self.out(F.relu(h))

    @torch.no_grad()
    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Binary images (B, C, H, W) drawn in raster order (channels in order within a pixel) given z (B, D)."""
        cond = self.maps(z)
        b, (_, _, h, w) = z.shape[0], cond[0].shape
        c = self.out.out_channels
        like = cond[0]
        data = self.first.input_buffer(b, h, w, like)  # the drawn pixels, scaled to [-1, 1], zero-padded
        inputs = [conv.input_buffer(b, h, w, like) for conv in self.convs]  # relu(h) of each layer's input
        image = like.new_zeros(b, c, h, w)
        for i in range(h):
            for j in range(w):
                for ch in range(c):  # channel ch sees the channels < ch of this pixel (mask A groups)
                    feat = self.first.at(data, i, j) + cond[0][:, :, i, j]  # (B, F)
                    for conv, buf, m in zip(self.convs, inputs, cond[1:], strict=True):
                        conv.put(buf, i, j, F.relu(feat))
                        feat = feat + conv.at(buf, i, j) + m[:, :, i, j]
                    p = torch.sigmoid(self.out.pointwise(F.relu(feat))[:, ch])  # (B,)
                    pixel = torch.bernoulli(p, generator=generator)
                    image[:, ch, i, j] = pixel
                    self.first.put(data, i, j, pixel * 2 - 1, channel=ch)
        return image


@register_model("vae", "variational autoencoder: ELBO, IWAE bound, KL annealing and free bits against collapse")
class VAE(GenerativeModel):
    Config = Config
    tiny = {"latent_dim": 4, "widths": [8, 16], "iwae_k": 4}
    sample_options = frozenset({"temperature", "truncation", "interpolate", "traverse", "traverse_dim"})
    capabilities = frozenset({"log_likelihood", "encode", "reconstruct", "walk"})

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if config.latent_dim < 1:
            raise GenaiError(f"model.latent_dim must be >= 1, got {config.latent_dim}")
        if config.iwae_k < 1:
            raise GenaiError(f"model.iwae_k must be >= 1, got {config.iwae_k}; use e.g. 64")
        if config.free_bits < 0 or config.beta < 0:
            raise GenaiError(f"model.beta and model.free_bits must be >= 0, got {config.beta}, {config.free_bits}")
        if config.scale is not None and config.scale <= 0:
            raise GenaiError(f"model.scale must be > 0 (or null to learn it), got {config.scale}")
        if config.autoregressive < 0:
            raise GenaiError(f"model.autoregressive must be >= 0 (mask-B layers of the PixelCNN decoder; 0: off), "
                             f"got {config.autoregressive}")
        if config.autoregressive and (config.decoder != "bernoulli" or not spec.binary):
            raise GenaiError("model.autoregressive draws binary pixels: it needs model.decoder bernoulli and "
                             "binarised data (--set data.binarize=true)")
        d = config.latent_dim
        self.encoder = ConvEncoder(spec.channels, spec.size, config.widths, config.norm)
        # Two heads on the shared features: the posterior's mean and its log-variance.
        self.mean_head = nn.Linear(self.encoder.feature_dim, d)
        self.logvar_head = nn.Linear(self.encoder.feature_dim, d)
        if config.autoregressive:
            self.decoder = PixelDecoder(d, spec, config.widths, config.norm, config.autoregressive_channels,
                                        config.autoregressive)
        else:
            self.decoder = ConvDecoder(d, spec.channels, spec.size, config.widths, config.norm)
        if config.decoder != "bernoulli":
            if config.scale is None:
                # Starts near a trained model's pixel error so early training is not all KL; learned after.
                self.log_scale = nn.Parameter(torch.tensor(math.log(0.1)))
            else:
                self.register_buffer("log_scale", torch.tensor(math.log(config.scale)))
        if config.decoder == "bernoulli" and not spec.binary:
            # A Bernoulli decoder on grey levels has no normalised likelihood: withdraw the capability on this
            # instance (what callers ask) and its method (so nothing can report it), so no ELBO, IWAE bound or
            # bits/dim is reported for it.
            self.capabilities = self.capabilities - {"log_likelihood"}
            self.log_likelihood = None

    # -- encoder and decoder ------------------------------------------------------------------
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) in [0, 1] -> mu, logvar, each (B, latent_dim) float32."""
        h = self.encoder(x * 2 - 1)  # (B, F)
        return self.mean_head(h).float(), self.logvar_head(h).float()

    def encode(self, x: Tensor) -> Tensor:
        """The posterior mean, (B, latent_dim): the latent used for plots and interpolation."""
        return self.posterior(x)[0]

    def decode(self, z: Tensor, x: Tensor | None = None) -> Tensor:
        """(B, D) -> (B, C, H, W) decoder output: Bernoulli logits, or the pre-sigmoid mean. The autoregressive
        decoder also reads the image x (B, C, H, W) whose pixels it predicts, each from those before it."""
        if self.config.autoregressive:
            return self.decoder(x, z).float()
        return self.decoder(z).float()

    def draw(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """What samples and walks show for latents z (B, D): the decoder's mean image in [0, 1], or for the
        autoregressive decoder binary images drawn pixel by pixel."""
        if self.config.autoregressive:
            return self.decoder.sample(z, generator)
        return self.mean_image(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> the decoder's image at their posterior means: a collapsed posterior
        reconstructs every image as the same average digit (the loop writes these grids beside the samples)."""
        return self.draw(self.encode(x), torch.Generator(x.device).manual_seed(0))

    def mean_image(self, out: Tensor) -> Tensor:
        """The decoder distribution's mean, (B, C, H, W) in [0, 1]: what samples and walks show."""
        return torch.sigmoid(out)

    def log_px(self, out: Tensor, x: Tensor) -> Tensor:
        """log p(x | z) summed over pixels, (B,) nats, for decoder output ``out`` (B, C, H, W).

        A probability of binary pixels (Bernoulli) or of 8-bit ones (discretised Gaussian/Laplace); for a
        Bernoulli decoder on grey levels, minus the binary cross-entropy: a reconstruction error, no likelihood.
        """
        if self.config.decoder == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:
            kind = "gaussian" if self.config.decoder == "gaussian" else "laplace"
            lp = discretized_log_prob(x, torch.sigmoid(out), self.log_scale.float(), kind)
        return lp.flatten(1).sum(1)

    def kl_beta(self, step: int) -> float:
        return kl_beta(step, self.config.beta, self.config.kl_warmup_steps)

    # -- training -----------------------------------------------------------------------------
    def loss(self, batch):
        x, _ = batch
        mu, logvar = self.posterior(x)  # (B, D) each
        # Reparameterisation (Kingma & Welling 2014, sec. 2.4): z = mu + sigma * eps, eps ~ N(0, I).
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)  # (B, D)
        recon = -self.log_px(self.decode(z, x), x).mean()  # nats per image
        kl = gaussian_kl(mu, logvar)  # (B, D)
        beta = self.kl_beta(self.current_step)
        loss = recon + beta * free_bits_kl(kl, self.config.free_bits).sum()
        kl_image = kl.sum(1).mean()
        out = {"loss": loss, "recon": recon.detach(), "kl": kl_image.detach()}
        if has(self, "log_likelihood"):  # a proper likelihood: recon + KL is the -ELBO
            out["nelbo"] = (recon + kl_image).detach()  # nats per image (beta = 1, no free bits)
        out["beta"] = torch.tensor(beta)
        out["active_units"] = self._active_units(mu.detach())  # this batch's estimate; validation uses all data
        return out

    @staticmethod
    def _active_units(mu: Tensor) -> Tensor:
        if mu.shape[0] < 2:
            return torch.tensor(0.0)
        return (mu.var(0, correction=0) > ACTIVE_UNIT_THRESHOLD).sum().float()

    # -- likelihood ---------------------------------------------------------------------------
    def elbo(self, batch) -> Tensor:
        """The ELBO, a lower bound on log p(x): (B,) nats, from one posterior sample per image. A bound on the
        probability of the binary or 8-bit image, except for a Bernoulli decoder on grey levels."""
        x, _ = batch
        mu, logvar = self.posterior(x)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.log_px(self.decode(z, x), x) - gaussian_kl(mu, logvar).sum(1)

    log_likelihood = elbo  # the capability the toolkit reads (bits/dim); withdrawn on instances without a likelihood

    @torch.no_grad()
    def iwae_bound(self, batch, k: int, *, generator: torch.Generator | None = None) -> Tensor:
        """The importance-weighted bound with k samples (Burda et al. 2016, eq. 8), (B,) nats:

            log (1/k) sum_i p(x, z_i) / q(z_i | x),  z_i ~ q(z | x).

        k = 1 is the ELBO in expectation; the bound tightens towards log p(x) as k grows.
        """
        if k < 1:
            raise GenaiError(f"the IWAE bound needs k >= 1 importance samples, got {k}")
        if not has(self, "log_likelihood"):
            raise GenaiError("a Bernoulli decoder on grey levels has no likelihood to bound; binarise the data "
                             "(data.binarize) or use model.decoder gaussian or l1")
        x, _ = batch
        b = x.shape[0]
        mu, logvar = self.posterior(x)  # (B, D)
        std = (0.5 * logvar).exp()
        chunk = max(1, IWAE_CHUNK_IMAGES // b)
        log_w = []
        for start in range(0, k, chunk):
            kk = min(chunk, k - start)
            eps = torch.randn(kk, *mu.shape, generator=generator, device=mu.device)
            z = mu + std * eps  # (kk, B, D)
            xs = x.expand(kk, *x.shape).flatten(0, 1)  # (kk * B, C, H, W)
            log_px = self.log_px(self.decode(z.flatten(0, 1), xs), xs).view(kk, b)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)  # (kk, B), log N(z; 0, I)
            log_qz = -0.5 * (eps.pow(2) + math.log(2 * math.pi) + logvar).sum(-1)  # log N(z; mu, sigma^2)
            log_w.append(log_px + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_w), 0) - math.log(k)  # (B,)

    # -- diagnostics --------------------------------------------------------------------------
    @torch.no_grad()
    def latent_diagnostics(self, batches) -> dict:
        """Over a dataset: the KL per latent dimension (mean over images), the variance over the data of
        each dimension's posterior mean, and the number of active units (that variance > 0.01)."""
        d = self.config.latent_dim
        kl_sum = torch.zeros(d, dtype=torch.float64)
        mu_sum = torch.zeros(d, dtype=torch.float64)
        mu_sq = torch.zeros(d, dtype=torch.float64)
        count = 0
        for x, _ in batches:
            mu, logvar = self.posterior(x)
            kl_sum += gaussian_kl(mu, logvar).sum(0).double().cpu()
            mu_sum += mu.sum(0).double().cpu()
            mu_sq += mu.pow(2).sum(0).double().cpu()
            count += x.shape[0]
        count = max(count, 1)
        mu_var = (mu_sq / count - (mu_sum / count).pow(2)).clamp(min=0)
        return {
            "kl_per_dim": (kl_sum / count).tolist(),
            "posterior_mean_var": mu_var.tolist(),
            "active_units": int((mu_var > ACTIVE_UNIT_THRESHOLD).sum()),
        }

    @torch.no_grad()
    def validation_metrics(self, batches) -> dict[str, float]:
        """The base metrics (loss terms, ELBO as nll_nats and bits_per_dim), plus the latent diagnostics and
        the IWAE bound with k = ``iwae_k`` (as an NLL: iwae_nats <= nll_nats up to noise). Without a likelihood
        (Bernoulli decoder, grey levels): the loss terms and diagnostics only."""
        batches = list(batches)  # read three times
        metrics = super().validation_metrics(batches)
        diag = self.latent_diagnostics(batches)
        kl = diag["kl_per_dim"]
        metrics.update(active_units=float(diag["active_units"]), kl_total=sum(kl), kl_dim_max=max(kl),
                       kl_dim_min=min(kl))
        if not has(self, "log_likelihood"):
            return metrics
        g = torch.Generator(device=self.device).manual_seed(0)  # the same draws at every evaluation
        total, count = 0.0, 0
        for batch in batches:
            total -= float(self.iwae_bound(batch, self.config.iwae_k, generator=g).sum())
            count += batch[0].shape[0]
        metrics["iwae_nats"] = total / max(count, 1)
        metrics["iwae_bits_per_dim"] = self.bits_per_dim(metrics["iwae_nats"], self.spec)
        return metrics

    # -- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               truncation: float | None = None) -> Tensor:
        """Decode z ~ N(0, temperature^2 I); returns the decoder's mean image (not a noisy draw from it), or with the
        autoregressive decoder a draw of every pixel. ``truncation`` c: every coordinate of z beyond +-c (before the
        temperature) is drawn again until it falls inside, the truncation trick of Brock et al. 2019 (BigGAN, sec.
        3.1): the prior's unlikely corners, which the decoder saw least, are left out."""
        t = check_temperature(temperature)
        self.check_sample_options({"truncation": truncation})
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.device)
        while truncation is not None and bool((outside := z.abs() > truncation).any()):
            z = torch.where(outside, torch.randn(z.shape, generator=generator, device=z.device), z)
        return self.draw(t * z, generator)

    def check_sample_options(self, options) -> None:
        c = options.get("truncation")
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0):
            raise GenaiError(f"--truncation must be a positive number of standard deviations, got {c!r}")

    @torch.no_grad()
    def walk(self, rows: int, steps: int, *, generator: torch.Generator | None = None,
             images: Tensor | None = None, dim: int | None = None, temperature: float = 1.0) -> Tensor:
        """(rows * steps, C, H, W) in [0, 1]. Row i goes from the posterior mean of images[2i] to that of
        images[2i+1] (with images None: from the latent of ``sample(2 * rows)[2i]`` to that of ``[2i + 1]``,
        the same generator and temperature giving the same prior draws); with ``dim``, row i starts at the
        latent of images[i] (or of ``sample(rows)[i]``) and latent dimension ``dim`` takes values in [-3, 3]
        (prior standard deviations) while the rest stays. See ``genai_cli.nn.latent``."""
        z = walk_latents(rows, steps, latent_dim=self.config.latent_dim,
                         draw=lambda k, t: t * torch.randn(k, self.config.latent_dim, generator=generator,
                                                           device=self.device),
                         encode=lambda x: self.encode(x.to(self.device)), images=images, dim=dim,
                         temperature=temperature, name="vae")
        return self.draw(z, generator)
