"""Denoising diffusion probabilistic models (Ho, Jain & Abbeel 2020), sampled by DDPM or DDIM (Song et al. 2021).

The forward process adds Gaussian noise over T steps, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I);
a UNet eps_theta(x_t, t) learns to predict the noise that was added (Algorithm 1), and sampling runs the
process backwards from pure noise (Algorithm 2, or DDIM's shorter, optionally deterministic chain).

The noise schedule (``NoiseSchedule``) is kept apart from the network, as in diffusers' schedulers: it owns
every beta/alpha and the maths of one step, the model owns the UNet and the loop. Images live in [-1, 1]
inside the model (the data is scaled so that the prior N(0, I) matches its range) and come out in [0, 1].

Timesteps are 0-based: t = 0..T-1 here is the paper's t = 1..T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn.unet import UNet
from ..registry import register_model
from .base import GenerativeModel, ImageSpec

SAMPLERS = ("ddpm", "ddim")
SCHEDULES = ("linear", "cosine")
DEFAULT_DDIM_STEPS = 50


# ---------------------------------------------------------------------------------------------
# The noise schedule
# ---------------------------------------------------------------------------------------------
def make_betas(timesteps: int, schedule: str) -> Tensor:
    """beta_t for t = 0..T-1, in float64.

    linear: Ho et al.'s 1e-4..0.02 for T = 1000, scaled by 1000/T for other T so the total noise stays
    about the same (Nichol & Dhariwal 2021, improved-DDPM code). For T < 20 the scaled end passes 1 and
    is capped at 0.999, as the cosine schedule caps its betas.
    cosine: alphā(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008 (Nichol & Dhariwal eq. 17),
    beta_t = 1 - alphā(t+1) / alphā(t), capped at 0.999 to avoid the singularity at t = T.
    """
    if timesteps < 1:
        raise GenaiError(f"timesteps must be >= 1, got {timesteps}; use e.g. 1000")
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = 1 - f[1:] / f[:-1]
    else:
        raise GenaiError(f"unknown noise schedule '{schedule}'; valid: {', '.join(SCHEDULES)}")
    return betas.clamp(max=0.999)


class NoiseSchedule(nn.Module):
    """The fixed forward process and the maths of one reverse step, for DDPM and DDIM.

    An nn.Module only so that ``.to(device)`` moves its tensors with the model; its buffers are not
    persistent (they follow from ``timesteps`` and ``schedule``, which the config already stores).
    Methods taking ``t`` accept an int (the same step for the whole batch) or a (B,) long tensor.
    """

    def __init__(self, timesteps: int = 1000, schedule: str = "linear"):
        super().__init__()
        self.timesteps = timesteps
        self.schedule = schedule
        betas = make_betas(timesteps, schedule)  # float64 while deriving, float32 once stored
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(mu_tilde, beta_tilde I), Ho eq. 6-7.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        posterior_mean_x0 = alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod)
        posterior_mean_xt = alphas.sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        for name, value in [("betas", betas), ("alphas", alphas), ("alphas_cumprod", alphas_cumprod),
                            ("alphas_cumprod_prev", alphas_cumprod_prev), ("posterior_variance", posterior_variance),
                            ("posterior_mean_x0", posterior_mean_x0), ("posterior_mean_xt", posterior_mean_xt)]:
            self.register_buffer(name, value.float(), persistent=False)

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, schedule={self.schedule!r}"

    @staticmethod
    def _at(values: Tensor, t: int | Tensor, x: Tensor) -> Tensor:
        """values[t], shaped to broadcast against x: a scalar for an int t, (B, 1, 1, 1) for a (B,) tensor."""
        if isinstance(t, Tensor) and t.dim() > 0:
            return values[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        return values[int(t)].to(x.dtype)

    def _check_t(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.timesteps:
            raise ValueError(f"timestep {t} outside 0..{self.timesteps - 1}")
        return t

    # -- forward process --------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0) = N(sqrt(alphā_t) x_0, (1 - alphā_t) I), Ho eq. 4, given the noise."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """x_0 implied by x_t and a noise estimate: eq. 4 solved for x_0 (DDIM eq. 9's "predicted x_0")."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    # -- DDPM ancestral step ---------------------------------------------------------------------
    def ddpm_step(self, model_eps: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None = None,
                  clip_x0: bool = False) -> Tensor:
        """x_{t-1} ~ p_theta(x_{t-1} | x_t), Ho Algorithm 2 line 4.

        The mean 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphā_t) eps) is computed in its equivalent form
        mu_tilde(x_t, x0_hat) (eq. 7 with x0_hat from eq. 4), which lets ``clip_x0`` clamp x0_hat to the data
        range [-1, 1] first; without clipping the two are identical.
        The variance is the posterior's beta_tilde_t (eq. 7), not beta_t. Ho et al. found both give similar
        samples at T = 1000; beta_tilde is the exact choice when x_0 is a point (true of images, far from
        N(0, I)), it is 0 at the last step as Algorithm 2's z = 0 asks, and it stays sensible for small T,
        where beta_t is large and would leave visible noise in the samples.
        """
        t = self._check_t(t)
        x0 = self.predict_x0(x_t, model_eps, t)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        mean = self.posterior_mean_x0[t] * x0 + self.posterior_mean_xt[t] * x_t
        if t == 0:
            return mean
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + self.posterior_variance[t].sqrt() * z

    # -- DDIM -------------------------------------------------------------------------------------
    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T-1 down to 0, evenly spaced (a sub-sequence tau of DDIM sec. 4.2).

        Starting at T-1 matters: the chain must start where x_T is pure noise. Spacing >= 1 keeps them distinct.
        """
        if not 1 <= steps <= self.timesteps:
            raise GenaiError(f"DDIM steps must be in 1..{self.timesteps} (the schedule's timesteps), got {steps}")
        return [int(v) for v in torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round()]

    def ddim_step(self, eps: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 0.0,
                  generator: torch.Generator | None = None, clip_x0: bool = False) -> Tensor:
        """x_{t_prev} from x_t, Song et al. eq. 12; t_prev = -1 means the end of the chain (alphā = 1).

        x_prev = sqrt(alphā_prev) x0_hat + sqrt(1 - alphā_prev - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - alphā_prev) / (1 - alphā_t)) sqrt(1 - alphā_t / alphā_prev) (eq. 16):
        eta = 0 is the deterministic DDIM, eta = 1 the DDPM posterior. For eta > 1 the eps coefficient is
        floored at 0. ``clip_x0`` clamps x0_hat to [-1, 1] and uses the eps that the clamped x0_hat implies.
        """
        t = self._check_t(t)
        if not -1 <= t_prev < t:
            raise ValueError(f"t_prev must be in -1..{t - 1}, got {t_prev}")
        if eta < 0:
            raise GenaiError(f"eta must be >= 0, got {eta}; use 0 for deterministic DDIM, 1 for DDPM-like noise")
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar)
        x0 = self.predict_x0(x_t, eps, t)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            # Re-derive eps from the clipped x0 (eq. 4 solved for eps), so that x_prev is again a point of the
            # forward process, as in guided-diffusion's DDIM. Keeping the model's eps instead mixes a clipped
            # x0 with a noise estimate that contradicts it: with guidance w >= 2 that wrecked 50-step samples.
            eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()  # eq. 16
        direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps  # "direction pointing to x_t"
        x_prev = abar_prev.sqrt() * x0 + direction  # eq. 12
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device,
                                                  dtype=x_t.dtype)
        return x_prev


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attention_levels: list[int] = field(default_factory=list)  # extra levels; the bottleneck always attends
    dropout: float = 0.0
    timesteps: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    class_conditional: bool = False
    cond_drop_prob: float = 0.1  # label dropout, trains the unconditional model for classifier-free guidance
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    steps: int | None = None  # DDIM steps; None: 50 (or T if smaller) for ddim, T for ddpm
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    guidance: float = 1.0  # classifier-free guidance weight w (class_conditional only); 1 = plain conditional
    clip_x0: bool = True  # clamp each step's predicted x_0 to [-1, 1] while sampling (steadier early in training)


@register_model("ddpm", "Denoising diffusion (DDPM/DDIM) with a UNet")
class DDPM(GenerativeModel):
    """eps-prediction diffusion: loss is Ho et al.'s L_simple, sampling is DDPM (Algorithm 2) or DDIM."""

    Config = Config
    tiny = {"base_channels": 8, "channel_mults": [1, 2], "timesteps": 20}
    sample_options = frozenset({"sampler", "steps", "eta", "guidance", "labels"})

    def __init__(self, config: Config, spec: ImageSpec):
        super().__init__(config, spec)
        if config.class_conditional and spec.num_classes <= 0:
            raise GenaiError("class_conditional: true needs a labelled dataset (this one has no classes); "
                             "set model.class_conditional=false or use a dataset with labels")
        if not 0.0 <= config.cond_drop_prob < 1.0:
            raise GenaiError(f"cond_drop_prob must be in [0, 1), got {config.cond_drop_prob}")
        self.schedule = NoiseSchedule(config.timesteps, config.schedule)
        self.unet = UNet(in_channels=spec.channels, base_channels=config.base_channels,
                         channel_mults=config.channel_mults, num_res_blocks=config.num_res_blocks,
                         attention_levels=config.attention_levels, dropout=config.dropout,
                         num_classes=spec.num_classes if config.class_conditional else 0)
        self.unet.check_image_size(spec.size)
        self.null_label = spec.num_classes  # the UNet's "no label" row
        # Check the config's sampling defaults now, so a bad YAML fails at load time, not after training.
        self._resolve_options(config.sampler, config.steps, config.eta, config.guidance, explicit=False)

    @property
    def conditional(self) -> bool:
        return self.config.class_conditional

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Ho Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), || eps - eps_theta(x_t, t) ||^2 (L_simple, eq. 14)."""
        x, y = batch
        x0 = x * 2 - 1  # [0, 1] -> [-1, 1]
        b = x0.shape[0]
        t = torch.randint(0, self.config.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)  # eq. 4
        labels = None
        if self.config.class_conditional:
            # Label dropout: a fraction of the batch learns the unconditional model (Ho & Salimans 2022, Alg. 1).
            drop = torch.rand(b, device=x0.device) < self.config.cond_drop_prob
            labels = torch.where(drop, torch.full_like(y, self.null_label), y)
        eps = self.unet(x_t, t, labels)
        return {"loss": F.mse_loss(eps.float(), noise.float())}

    # -- sampling -------------------------------------------------------------------------------
    def _resolve_options(self, sampler, steps, eta, guidance, explicit: bool = True):
        """Validate sampling options; returns (sampler, steps, eta, guidance) with defaults filled in."""
        cfg = self.config
        T = cfg.timesteps
        where = "" if explicit else "model."
        if sampler not in SAMPLERS:
            raise GenaiError(f"unknown {where}sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
        if steps is not None and not 1 <= steps <= T:
            raise GenaiError(f"{where}steps must be in 1..{T} (the model's timesteps), got {steps}")
        if sampler == "ddpm":
            if steps is not None and steps != T:
                raise GenaiError(f"the ddpm sampler runs all {T} steps, got steps={steps}; "
                                 f"use sampler ddim for fewer steps")
            steps = T
        elif steps is None:
            steps = min(DEFAULT_DDIM_STEPS, T)
        if eta < 0:
            raise GenaiError(f"{where}eta must be >= 0, got {eta}; use 0 for deterministic DDIM")
        if guidance < 0:
            raise GenaiError(f"{where}guidance must be >= 0, got {guidance}; 1 is plain conditional sampling")
        if not cfg.class_conditional and guidance != 1.0:
            raise GenaiError(f"{where}guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        return sampler, steps, eta, guidance

    def _labels(self, labels, n: int, device: torch.device) -> Tensor | None:
        """(n,) long labels on device for a conditional model; None for an unconditional one."""
        k = self.spec.num_classes
        if not self.config.class_conditional:
            if labels is not None:
                raise GenaiError("labels need a class-conditional model; "
                                 "train with model.class_conditional=true or drop the label option")
            return None
        if labels is None:  # cycle through the classes, so an n-image grid of width k shows one class per column
            return torch.arange(n, device=device) % k
        labels = torch.as_tensor(labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise GenaiError(f"labels must be integers in 0..{k - 1}, got dtype {labels.dtype}")
        labels = labels.long()
        if labels.dim() == 0:  # one label for every image
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise GenaiError(f"labels must be one label or one per image ({n}), got shape {tuple(labels.shape)}")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < k):
            raise GenaiError(f"labels must be in 0..{k - 1} (the dataset's classes), "
                             f"got values from {int(labels.min())} to {int(labels.max())}")
        return labels

    def _eps(self, x: Tensor, t: int, labels: Tensor | None, guidance: float) -> Tensor:
        """eps_theta(x_t, t), with classifier-free guidance (Ho & Salimans 2022 eq. 6) for conditional models."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if labels is None or guidance == 1.0:
            return self.unet(x, tt, labels).float()
        null = torch.full_like(labels, self.null_label)
        if guidance == 0.0:
            return self.unet(x, tt, null).float()
        # One batch of 2n: conditional and unconditional halves share the forward pass.
        eps_cond, eps_uncond = self.unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])) \
            .float().chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
               steps: int | None = None, eta: float | None = None, guidance: float | None = None,
               labels=None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]. Options default to the config's; see ``sample_options``.

        labels: a (n,) LongTensor (or one int for all) of classes, conditional models only; by default
        image i gets class i % num_classes. guidance: w in eps_uncond + w (eps_cond - eps_uncond).
        """
        cfg = self.config
        eta_given = eta is not None
        if guidance is not None and not cfg.class_conditional:
            raise GenaiError("guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        sampler, steps, eta, guidance = self._resolve_options(
            cfg.sampler if sampler is None else sampler,
            steps if steps is not None else (cfg.steps if sampler in (None, cfg.sampler) else None),
            cfg.eta if eta is None else eta,
            cfg.guidance if guidance is None else guidance)
        if eta_given and sampler == "ddpm":
            raise GenaiError("eta applies to the ddim sampler only; add sampler ddim or drop eta")
        device = self.device
        labels = self._labels(labels, n, device)

        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            x = torch.randn((n, *self.spec.shape), generator=generator, device=device)  # x_T ~ N(0, I)
            if sampler == "ddpm":
                for t in reversed(range(cfg.timesteps)):
                    x = self.schedule.ddpm_step(self._eps(x, t, labels, guidance), t, x, generator, cfg.clip_x0)
            else:
                ts = self.schedule.ddim_timesteps(steps)
                for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
                    x = self.schedule.ddim_step(self._eps(x, t, labels, guidance), t, t_prev, x, eta, generator,
                                                cfg.clip_x0)
        finally:
            self.train(was_training)
        return ((x + 1) / 2).clamp(0, 1)

    # -- likelihood: the variational bound (read by genai evaluate, not by the training loop) -------------
    @torch.no_grad()
    def variational_bound(self, batch, timesteps_per_image: int = 10,
                          generator: torch.Generator | None = None) -> Tensor:
        """An unbiased estimate of the variational lower bound on log p(x) of 8-bit images, (B,) nats.

        Ho et al. eq. 5: -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0, with
            L_T     = KL(q(x_T | x_0) || N(0, I)), in closed form;
            L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)): two Gaussians with the variance the
                      sampler uses (beta_tilde_t), so ||mu_tilde - mu_theta||^2 / (2 beta_tilde_t) per pixel;
            L_0     = -log p_theta(x_0 | x_1), the discretised Gaussian decoder (eq. 13) with variance beta_1,
                      which makes this a bound on the probability of the 256-level data.
        The T - 1 middle terms are estimated by stratified sampling: the timesteps 1..T-1 are cut into
        ``timesteps_per_image`` equal strata, one t is drawn in each, and its term counts for its whole stratum.
        Not named ``log_likelihood``: at k + 1 network passes per image it is too slow for every validation.
        Conditional models are scored with each image's own label: a bound on log p(x | y).
        """
        x, y = batch
        s, T = self.schedule, self.config.timesteps
        x0 = x.float() * 2 - 1  # (B, C, H, W), pixel levels k / 255 mapped to [-1, 1]
        b, dims, device = x0.shape[0], tuple(range(1, x0.dim())), x0.device
        labels = y if self.config.class_conditional else None
        abar_last = s.alphas_cumprod[T - 1].double()
        prior = 0.5 * (abar_last * x0.double() ** 2 + (1 - abar_last) - 1 - torch.log(1 - abar_last)).sum(dims)

        def eps_at(t: Tensor) -> tuple[Tensor, Tensor]:
            x_t = s.add_noise(x0, torch.randn(x0.shape, generator=generator, device=device), t)
            return x_t, self.unet(x_t, t, labels).float()

        # L_0: the model's mean at the first step is its x_0 estimate (alphā_prev = 1 there).
        x_1, eps = eps_at(torch.zeros(b, dtype=torch.long, device=device))
        mean = s.predict_x0(x_1, eps, 0).double()
        std = s.betas[0].double().sqrt()
        upper = torch.where(x0 > 1 - 1e-3, math.inf, x0.double() + 1 / 255)  # bin edges, open at -1 and 1
        lower = torch.where(x0 < -1 + 1e-3, -math.inf, x0.double() - 1 / 255)
        probs = torch.special.ndtr((upper - mean) / std) - torch.special.ndtr((lower - mean) / std)
        decoder = -probs.clamp(min=1e-12).log().sum(dims)

        k = max(1, min(timesteps_per_image, T - 1))
        middle = torch.zeros(b, dtype=torch.float64, device=device)
        for j in range(k if T > 1 else 0):
            lo, hi = 1 + (T - 1) * j // k, 1 + (T - 1) * (j + 1) // k  # stratum [lo, hi) of 1..T-1
            t = torch.randint(lo, hi, (b,), generator=generator, device=device)
            x_t, eps = eps_at(t)
            # mu_tilde(x_t, x_0) - mu_tilde(x_t, x0_hat) (eq. 7): the x_t terms cancel.
            gap = s._at(s.posterior_mean_x0, t, x0) * (x0 - s.predict_x0(x_t, eps, t))
            kl = gap.double().pow(2).sum(dims) / (2 * s.posterior_variance[t].double())
            middle += kl * (hi - lo)
        return -(prior + decoder + middle).float()
