"""Denoising diffusion probabilistic models (Ho, Jain & Abbeel 2020), with DDPM, DDIM (Song et al. 2021),
DPM-Solver++(2M) (Lu et al. 2022) and Heun (Karras et al. 2022) samplers.

The forward process adds Gaussian noise over T steps, q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I);
a UNet learns to predict the noise that was added (Algorithm 1), or equivalently v (Salimans & Ho 2022) or x_0
itself (``model.prediction``), and sampling runs the process backwards from pure noise: Algorithm 2, DDIM's
shorter, optionally deterministic chain, or a higher-order solver of the same probability-flow ODE.

The noise schedule (``NoiseSchedule``) is kept apart from the network, as in diffusers' schedulers: it owns
every beta/alpha and the maths of one step, the model owns the UNet and the loop. Images live in [-1, 1]
inside the model (the data is scaled so that the prior N(0, I) matches its range) and come out in [0, 1];
latent diffusion (latent_diffusion.py) swaps that space for an autoencoder's latent grid and keeps the rest.
``model.size`` (S, M, L) picks the UNet's widths and depths from a preset; fields set explicitly win.

Timesteps are 0-based: t = 0..T-1 here is the paper's t = 1..T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import GenaiError
from ..nn.discretized import discretized_log_prob
from ..nn.dit import DiT
from ..nn.unet import UNet
from ..registry import register_model
from .base import GenerativeModel, ImageSpec

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "heun")
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20, "heun": 20}  # ddpm always runs all T steps
SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("none", "min_snr")


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
    """The fixed forward process, the conversions between what a network may predict, and one step of each sampler.

    An nn.Module only so that ``.to(device)`` moves its tensors with the model; its buffers are not
    persistent (they follow from ``timesteps`` and ``schedule``, which the config already stores).
    Methods taking ``t`` accept an int (the same step for the whole batch) or a (B,) long tensor; the sampler
    steps take ints, where t = -1 stands for the end of every chain, x_0 itself (alphā = 1, sigma = 0).
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
        # The same alphā_t as plain floats (the float32 values above), for the samplers' per-step scalars: no
        # device round trip per step, and float64 arithmetic on them.
        self._abar = self.alphas_cumprod.tolist()

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

    def _alpha_sigma(self, t: int) -> tuple[float, float]:
        """(sqrt(alphā_t), sqrt(1 - alphā_t)), the signal and noise scales of x_t; (1, 0) at t = -1."""
        abar = 1.0 if t == -1 else self._abar[t]
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def sigma(self, t: int) -> float:
        """Karras et al.'s noise level sigma_t = sqrt((1 - alphā_t) / alphā_t): x_t / sqrt(alphā_t) = x_0 + sigma_t eps.

        EDM Table 1 writes this variance-preserving process as s(t) = 1 / sqrt(1 + sigma^2); sigma = 0 at t = -1.
        """
        alpha, sigma_vp = self._alpha_sigma(t)
        return sigma_vp / alpha

    def snr(self, t: int | Tensor, x: Tensor) -> Tensor:
        """SNR(t) = alphā_t / (1 - alphā_t), x_t's signal-to-noise ratio (Kingma et al. 2021), shaped by ``_at``."""
        abar = self._at(self.alphas_cumprod, t, x)
        return abar / (1 - abar)

    # -- forward process --------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: int | Tensor) -> Tensor:
        """A draw of x_t ~ q(x_t | x_0) = N(sqrt(alphā_t) x_0, (1 - alphā_t) I), Ho eq. 4, given the noise."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    # -- what the network predicts: eps, v or x_0, and how each determines the others ------------------
    def predict_x0(self, x_t: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """x_0 implied by x_t and a noise estimate: eq. 4 solved for x_0 (DDIM eq. 9's "predicted x_0")."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps(self, x_t: Tensor, x0: Tensor, t: int | Tensor) -> Tensor:
        """The noise implied by x_t and an x_0 estimate: eq. 4 solved for eps."""
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def velocity(self, x0: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """v = sqrt(alphā_t) eps - sqrt(1 - alphā_t) x_0, the "velocity" target of Salimans & Ho 2022 (sec. 4)."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def target(self, x0: Tensor, eps: Tensor, t: int | Tensor, prediction: str) -> Tensor:
        """What a network predicting ``prediction`` (eps, v or x0) is trained to output for x_t = add_noise(x0, eps)."""
        if prediction == "eps":
            return eps
        if prediction == "v":
            return self.velocity(x0, eps, t)
        if prediction == "x0":
            return x0
        raise GenaiError(f"unknown prediction target '{prediction}'; valid: {', '.join(PREDICTIONS)}")

    def eps_and_x0(self, output: Tensor, x_t: Tensor, t: int | Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """(eps, x_0) that a network output for (x_t, t) stands for, whichever target it predicts: ``target``'s inverse.

        The pair always satisfies x_t = sqrt(alphā_t) x_0 + sqrt(1 - alphā_t) eps. From v (Salimans & Ho sec. 4):
        x_0 = sqrt(alphā_t) x_t - sqrt(1 - alphā_t) v and eps = sqrt(1 - alphā_t) x_t + sqrt(alphā_t) v.
        """
        if prediction == "eps":
            return output, self.predict_x0(x_t, output, t)
        if prediction == "x0":
            return self.predict_eps(x_t, output, t), output
        if prediction == "v":
            abar = self._at(self.alphas_cumprod, t, x_t)
            a, b = abar.sqrt(), (1 - abar).sqrt()
            return b * x_t + a * output, a * x_t - b * output
        raise GenaiError(f"unknown prediction target '{prediction}'; valid: {', '.join(PREDICTIONS)}")

    def loss_weight(self, t: Tensor, like: Tensor, prediction: str, weighting: str, gamma: float = 5.0) -> Tensor:
        """Per-sample weights (B, 1, 1, 1) of the squared error against ``prediction``'s target, for timesteps t (B,);
        ``like`` gives the dtype and the number of dimensions.

        none: 1 for every t (Ho et al.'s L_simple when the target is eps).
        min_snr: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"):
        the x_0 error weighted by min(SNR(t), gamma). Since ||eps - eps_hat||^2 = SNR ||x_0 - x0_hat||^2 and
        ||v - v_hat||^2 = (SNR + 1) ||x_0 - x0_hat||^2 at the same x_t, that is min(SNR, gamma) / SNR for an eps
        target, min(SNR, gamma) / (SNR + 1) for v, and min(SNR, gamma) for x_0.
        """
        if weighting == "none":
            return torch.ones_like(self.snr(t, like))
        if weighting != "min_snr":
            raise GenaiError(f"unknown loss weighting '{weighting}'; valid: {', '.join(LOSS_WEIGHTINGS)}")
        snr = self.snr(t, like)
        clipped = snr.clamp(max=gamma)  # Hang et al.: min(SNR(t), gamma) on the x_0 loss
        if prediction == "eps":
            return clipped / snr
        if prediction == "v":
            return clipped / (snr + 1)
        if prediction == "x0":
            return clipped
        raise GenaiError(f"unknown prediction target '{prediction}'; valid: {', '.join(PREDICTIONS)}")

    # -- DDPM ancestral step ---------------------------------------------------------------------
    def ddpm_step(self, x0: Tensor, t: int, x_t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x_{t-1} ~ p_theta(x_{t-1} | x_t), Ho Algorithm 2 line 4, from the model's x_0 estimate x0_hat.

        The mean 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphā_t) eps) is computed in its equivalent form
        mu_tilde(x_t, x0_hat) (eq. 7 with x0_hat from eq. 4), which works from any prediction target and lets the
        caller clamp x0_hat to the data range first; without clipping the two are identical.
        The variance is the posterior's beta_tilde_t (eq. 7), not beta_t. Ho et al. found both give similar
        samples at T = 1000; beta_tilde is the exact choice when x_0 is a point (true of images, far from
        N(0, I)), it is 0 at the last step as Algorithm 2's z = 0 asks, and it stays sensible for small T,
        where beta_t is large and would leave visible noise in the samples.
        """
        t = self._check_t(t)
        mean = self.posterior_mean_x0[t] * x0 + self.posterior_mean_xt[t] * x_t
        if t == 0:
            return mean
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + self.posterior_variance[t].sqrt() * z

    # -- the timesteps of the shorter chains -----------------------------------------------------------
    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T-1 down to 0, evenly spaced (a sub-sequence tau of DDIM sec. 4.2); ddim and heun.

        It is diffusers' HeunDiscreteScheduler grid (timestep_spacing="linspace") rounded to whole timesteps, the
        only ones the UNet was trained on. Both samplers take a last step from t = 0 to t = -1 (sigma = 0).
        Starting at T-1 matters: the chain must start where x_T is pure noise. Spacing >= 1 keeps them distinct.
        """
        self._check_steps(steps)
        return [int(v) for v in torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round()]

    def dpm_solver_timesteps(self, steps: int) -> list[int]:
        """``steps`` timesteps from T-1 down to round((T-1) / steps): diffusers' DPMSolverMultistepScheduler grid
        (timestep_spacing="linspace", computed with numpy as there, so the two agree to the timestep).

        The solver's last step goes from the smallest of them straight to sigma = 0. Ending at t = 0 as DDIM's grid
        does would leave a long second-order step into sigma_0 ~ 0.01 (lambda jumps by ~3 there at 20 steps), which
        the multistep extrapolation handles badly. steps = T takes every timestep T-1..0: the linspace rule would
        repeat timesteps there.
        """
        self._check_steps(steps)
        if steps == self.timesteps:
            return list(range(self.timesteps - 1, -1, -1))
        return [int(v) for v in np.linspace(0, self.timesteps - 1, steps + 1).round()[::-1][:-1]]

    def _check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.timesteps:
            raise GenaiError(f"sampling steps must be in 1..{self.timesteps} (the schedule's timesteps), got {steps}")

    def _check_pair(self, t: int, t_prev: int) -> int:
        t = self._check_t(t)
        if not -1 <= t_prev < t:
            raise ValueError(f"t_prev must be in -1..{t - 1}, got {t_prev}")
        return t

    # -- DDIM -------------------------------------------------------------------------------------
    def ddim_step(self, eps: Tensor, x0: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
        """x_{t_prev} from x_t and the model's (eps, x0_hat) at t, Song et al. eq. 12; t_prev = -1 ends the chain.

        x_prev = sqrt(alphā_prev) x0_hat + sqrt(1 - alphā_prev - sigma^2) eps + sigma z, with
        sigma = eta sqrt((1 - alphā_prev) / (1 - alphā_t)) sqrt(1 - alphā_t / alphā_prev) (eq. 16):
        eta = 0 is the deterministic DDIM, eta = 1 the DDPM posterior. For eta > 1 the eps coefficient is
        floored at 0. (eps, x0_hat) should satisfy eq. 4 at x_t, as ``DDPM.denoise`` gives them even after
        clipping x0_hat, so that x_prev is again a point of the forward process.
        """
        t = self._check_pair(t, t_prev)
        if eta < 0:
            raise GenaiError(f"eta must be >= 0, got {eta}; use 0 for deterministic DDIM, 1 for DDPM-like noise")
        abar = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()  # eq. 16
        direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps  # "direction pointing to x_t"
        x_prev = abar_prev.sqrt() * x0 + direction  # eq. 12
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x_t.shape, generator=generator, device=x_t.device,
                                                  dtype=x_t.dtype)
        return x_prev

    # -- DPM-Solver++(2M) -------------------------------------------------------------------------
    def dpm_solver_step(self, x0: Tensor, t: int, t_prev: int, x_t: Tensor,
                        last: tuple[int, Tensor] | None = None) -> Tensor:
        """x_{t_prev} from x_t by DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), data-prediction form.

        With alpha_t = sqrt(alphā_t), sigma_t = sqrt(1 - alphā_t), lambda_t = log(alpha_t / sigma_t) and
        h = lambda_prev - lambda_t, one step of the exponential integrator is
            x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (e^{-h} - 1) D,
        with D = x0_hat for the first-order step (which is DDIM), and, given ``last`` = (t_last, x0_hat_last) of the
        previous step, the multistep second-order D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_last, r = h_last / h.
        The step to t_prev = -1 (sigma = 0, lambda = inf) is first order and lands on x0_hat, as diffusers'
        DPMSolverMultistepScheduler does with final_sigmas_type="zero".
        """
        t = self._check_pair(t, t_prev)
        if t_prev == -1:
            return x0  # the first-order update's limit as sigma_prev -> 0
        alpha, sigma = self._alpha_sigma(t)
        alpha_prev, sigma_prev = self._alpha_sigma(t_prev)
        lam, lam_prev = math.log(alpha / sigma), math.log(alpha_prev / sigma_prev)
        h = lam_prev - lam
        d = x0
        if last is not None:
            t_last, x0_last = last
            alpha_last, sigma_last = self._alpha_sigma(t_last)
            r = (lam - math.log(alpha_last / sigma_last)) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_last
        return (sigma_prev / sigma) * x_t - alpha_prev * math.expm1(-h) * d

    # -- Heun (Karras et al. 2022) ----------------------------------------------------------------
    def edm_step(self, slope: Tensor, t: int, t_next: int, x_t: Tensor) -> Tensor:
        """x_{t_next} from x_t by one step along dy/dsigma = slope, in y = x_t / sqrt(alphā_t) = x_0 + sigma eps.

        The probability-flow ODE there is dy/dsigma = (y - D(y; sigma)) / sigma = eps_hat (Karras et al. Algorithm 1
        line 4 with sigma(t) = t, s(t) = 1, D the x_0 estimate): an Euler step with slope = eps_hat is line 5 (and
        equals DDIM's eta = 0 step), the trapezoidal slope (eps_hat + eps_hat_next) / 2 is the Heun correction, line 8.
        With the cosine schedule, whose capped betas put sigma_{T-1} near 2e4 (Karras et al. start VP at ~150), the
        first step is so long that Heun's correction there is poorly conditioned: dpm++2m suits such schedules better.
        """
        t = self._check_pair(t, t_next)
        alpha, _ = self._alpha_sigma(t)
        alpha_next, _ = self._alpha_sigma(t_next)
        y_next = x_t / alpha + (self.sigma(t_next) - self.sigma(t)) * slope
        return alpha_next * y_next  # back to the variance-preserving x_{t_next}


# ---------------------------------------------------------------------------------------------
# The family
# ---------------------------------------------------------------------------------------------
# Size presets of the UNet (``model.size``): widths and depths only. S is the family's historical default; M is
# configs/ddpm_mnist.yaml's network; L doubles M's width (DDPM's CIFAR-10 width, Ho et al. appendix B, on three
# levels, so 28x28 still halves exactly: add a fourth level, channel_mults [1, 2, 2, 2], for 32x32 as DDPM does).
# Parameters and measured training images/s of each: README.md, "Speed and scale".
SIZES = ("S", "M", "L")
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "S": {"base_channels": 32, "channel_mults": [1, 2, 2], "num_res_blocks": 1, "attention_levels": []},
    "M": {"base_channels": 64, "channel_mults": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [1]},
    "L": {"base_channels": 128, "channel_mults": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [1]},
}


# Size presets of the DiT backbone (``model.backbone: dit``), in the spirit of DiT-S/B/L (Peebles & Xie 2023, Table 1:
# widths 384/768/1024, depths 12/12/24, 6/12/16 heads) scaled to what a CPU trains in minutes; heads of 32 channels
# throughout, MLP 4x wide. Pixel space: 4x4 patches (28x28 -> 49 tokens, 32x32 -> 64), plain DiT blocks. The latent
# presets (latent_diffusion.LATENT_DIT_PRESETS) use 1x1 patches (the 7x7 grid is already 49 tokens and 7 is prime)
# and turn on the long skips and local convolutions that were measured to pay there (nn/dit.py, ``DiT``). The label
# table starts at N(0, 1) (``label_init_std``; the latent S preset's differs: LATENT_DIT_PRESETS says why).
DIT_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads", "long_skip", "local_conv", "label_init_std")
UNET_FIELDS = ("base_channels", "channel_mults", "num_res_blocks", "attention_levels")
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "S": {"patch_size": 4, "hidden_size": 64, "depth": 4, "num_heads": 2, "long_skip": False, "local_conv": False,
          "label_init_std": 1.0},
    "B": {"patch_size": 4, "hidden_size": 128, "depth": 6, "num_heads": 4, "long_skip": False, "local_conv": False,
          "label_init_std": 1.0},
    "L": {"patch_size": 4, "hidden_size": 192, "depth": 8, "num_heads": 6, "long_skip": False, "local_conv": False,
          "label_init_std": 1.0},
}
BACKBONES = ("unet", "dit")


def resolve_size(config: Any, presets: dict[str, dict[str, Any]], default: str = "S") -> None:
    """Fill the preset fields the config left at None from ``presets[config.size]`` (``default`` when size is None).

    Explicit fields win: a preset field is None only when neither the YAML nor --set gave it. The config is
    resolved in place when it is built, so ``Config.to_dict`` (config.yaml, the checkpoint) stores the widths
    that were trained, and a checkpoint from before presets (every field set, no ``size``) loads unchanged.
    """
    if config.size is not None and config.size not in presets:
        backbone = getattr(config, "backbone", "unet")
        raise GenaiError(f"unknown model.size '{config.size}'; valid: {', '.join(presets)} for the {backbone} backbone "
                         f"(or leave it out)")
    for key, value in presets[config.size or default].items():
        if getattr(config, key) is None:
            setattr(config, key, list(value) if isinstance(value, list) else value)


def build_backbone(config: Any, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The denoising network ``config.backbone`` names, for points of ``shape`` (C, H, W): net(x, t, y) -> x-shaped.

    The one place the families on ``NetworkConfig`` build their network, so each of them takes either backbone.
    num_classes > 0: class-conditional, with a null label row for classifier-free guidance.
    """
    channels, height, width = shape
    if config.backbone == "dit":
        return DiT(channels, height, width, patch_size=config.patch_size, hidden=config.hidden_size,
                   depth=config.depth, heads=config.num_heads, dropout=config.dropout, num_classes=num_classes,
                   long_skip=config.long_skip, local=config.local_conv, label_std=config.label_init_std)
    return UNet(in_channels=channels, base_channels=config.base_channels, channel_mults=config.channel_mults,
                num_res_blocks=config.num_res_blocks, attention_levels=config.attention_levels,
                dropout=config.dropout, num_classes=num_classes)


@dataclass
class NetworkConfig:
    """The fields every family built on ``DenoisingFamily`` shares (ddpm, flow and their latent variants): the
    network's size preset and widths, and the class conditioning (label dropout trains the unconditional model
    that classifier-free guidance needs)."""

    backbone: Literal["unet", "dit"] = "unet"  # the denoising network: a UNet, or a diffusion transformer (DiT)
    # Preset of the backbone: UNet S/M/L (UNET_PRESETS), DiT S/B/L (DIT_PRESETS); fields set explicitly win.
    size: Literal["S", "M", "B", "L"] | None = None
    base_channels: int | None = None  # None: from the preset (S: 32)
    channel_mults: list[int] | None = None  # None: from the preset (S: [1, 2, 2])
    num_res_blocks: int | None = None  # None: from the preset (S: 1)
    attention_levels: list[int] | None = None  # extra levels; the bottleneck always attends. None: from the preset
    patch_size: int | None = None  # DiT only: p x p patches are its tokens. None: from the preset (S: 4)
    hidden_size: int | None = None  # DiT only: the token width. None: from the preset (S: 64)
    depth: int | None = None  # DiT only: adaLN-Zero blocks. None: from the preset (S: 4)
    num_heads: int | None = None  # DiT only: attention heads. None: from the preset (S: 2)
    long_skip: bool | None = None  # DiT only: U-ViT's long skips. None: from the preset (pixel: off, latent: on)
    local_conv: bool | None = None  # DiT only: a depthwise 3x3 conv in every block. None: as long_skip
    label_init_std: float | None = None  # DiT only: the label table's init std. None: the preset's (1; latent S: 0.2)
    dropout: float = 0.0
    class_conditional: bool = False
    cond_drop_prob: float = 0.1  # label dropout, trains the unconditional model for classifier-free guidance

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = UNET_PRESETS
    DIT_PRESETS: ClassVar[dict[str, dict[str, Any]]] = DIT_PRESETS

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise GenaiError(f"unknown model.backbone '{self.backbone}'; valid: {', '.join(BACKBONES)}")
        dit = self.backbone == "dit"
        # The other backbone's fields would be silently ignored: refuse them (from a YAML file or --set).
        foreign = [k for k in (UNET_FIELDS if dit else DIT_FIELDS) if getattr(self, k) is not None]
        if foreign:
            other = "unet" if dit else "dit"
            verb, them = ("belong", "them") if len(foreign) > 1 else ("belongs", "it")
            raise GenaiError(f"model.{', model.'.join(foreign)} {verb} to the {other} backbone, but model.backbone "
                             f"is {self.backbone}; drop {them} or set model.backbone={other}")
        resolve_size(self, self.DIT_PRESETS if dit else self.PRESETS)


@dataclass
class Config(NetworkConfig):
    timesteps: int = 1000
    schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["eps", "v", "x0"] = "eps"  # the UNet's target: the noise, v (Salimans & Ho), or x_0
    loss_weighting: Literal["none", "min_snr"] = "none"  # min_snr: Min-SNR-gamma (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min_snr (the paper's default)
    sampler: Literal["ddpm", "ddim", "dpm++2m", "heun"] = "ddpm"
    steps: int | None = None  # None: T for ddpm, 50 for ddim, 20 for dpm++2m and heun (at most T)
    eta: float = 0.0  # DDIM noise: 0 deterministic, 1 DDPM-like
    guidance: float = 1.0  # classifier-free guidance weight w (class_conditional only); 1 = plain conditional
    clip_x0: bool = True  # clamp each step's predicted x_0 to [-1, 1] while sampling (steadier early in training)


class DenoisingFamily(GenerativeModel):
    """What the diffusion and flow families share: a network over a pluggable space, conditioned on a (continuous
    or integer) time and, optionally, a class label with label dropout, a null label and classifier-free guidance.

    The space is pluggable: ``model_shape`` is the shape of one point there, ``to_model_space`` maps images in
    [0, 1] into it and ``from_model_space`` maps back. Here that is pixel space scaled to [-1, 1]; the latent
    families (``latent_diffusion.LatentSpace``) swap in an autoencoder's latent grid and keep the rest.
    ``network_calls`` is a running count of the calls of ``network`` (a guided call, one batch of 2n, counts once):
    what an adaptive solver spent is measured, not predicted (``network_evaluations`` predicts the fixed ones).
    """

    def __init__(self, config: NetworkConfig, spec: ImageSpec, parents=None):
        super().__init__(config, spec, parents)
        if config.class_conditional and spec.num_classes <= 0:
            raise GenaiError("class_conditional: true needs a labelled dataset (this one has no classes); "
                             "set model.class_conditional=false or use a dataset with labels")
        if not 0.0 <= config.cond_drop_prob < 1.0:
            raise GenaiError(f"cond_drop_prob must be in [0, 1), got {config.cond_drop_prob}")
        channels, height, width = self.model_shape
        # The attribute keeps the name "unet" whichever backbone it holds: checkpoints' keys stay "unet.*".
        self.unet = build_backbone(config, self.model_shape, spec.num_classes if config.class_conditional else 0)
        self.check_model_shape(height, width)
        self.null_label = spec.num_classes  # the UNet's "no label" row
        self.network_calls = 0

    @property
    def conditional(self) -> bool:
        return self.config.class_conditional

    # -- the space being denoised: pixels here, a latent grid in the latent families -------------------
    @property
    def model_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one point of the space the network works in: the image itself."""
        return self.spec.shape

    def check_model_shape(self, height: int, width: int) -> None:
        """Raise GenaiError unless the UNet halves both sides of ``model_shape`` exactly."""
        for side in dict.fromkeys((height, width)):
            self.unet.check_image_size(side)

    def to_model_space(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> x_0 (B, *model_shape): [-1, 1], so the prior N(0, I) matches the range."""
        return x * 2 - 1

    def from_model_space(self, x0: Tensor) -> Tensor:
        """x_0 (B, *model_shape) -> images (B, C, H, W) in [0, 1]."""
        return ((x0 + 1) / 2).clamp(0, 1)

    # -- labels and the network --------------------------------------------------------------------
    def training_labels(self, y: Tensor) -> Tensor | None:
        """The labels a training batch is conditioned on: None for an unconditional model; otherwise y with a
        ``cond_drop_prob`` share replaced by the null label, so the network also learns the unconditional model
        (Ho & Salimans 2022, Algorithm 1)."""
        if not self.config.class_conditional:
            return None
        drop = torch.rand(y.shape[0], device=y.device) < self.config.cond_drop_prob
        return torch.where(drop, torch.full_like(y, self.null_label), y)

    def network(self, x: Tensor, t: Tensor, labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """The network's output (float32) at (x, t (B,)), guided: out_uncond + w (out_cond - out_uncond), Ho &
        Salimans 2022 eq. 6, in one batch of 2n (w = 1: the conditional output, w = 0: the unconditional)."""
        self.network_calls += 1
        if labels is None or guidance == 1.0:
            return self.unet(x, t, labels).float()
        if guidance == 0.0:
            return self.unet(x, t, torch.full_like(labels, self.null_label)).float()
        null = torch.full_like(labels, self.null_label)
        out_cond, out_uncond = self.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])) \
            .float().chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)


@register_model("ddpm", "Denoising diffusion with a UNet (DDPM, DDIM, DPM-Solver++, Heun samplers)")
class DDPM(DenoisingFamily):
    """Diffusion with an eps-, v- or x_0-predicting UNet: loss is Ho et al.'s L_simple (optionally Min-SNR weighted),
    sampling is DDPM (Algorithm 2), DDIM, DPM-Solver++(2M) or Heun, all through ``denoise``.

    The space it denoises is pluggable (``DenoisingFamily``): pixel space scaled to [-1, 1] here; latent diffusion
    (``latent_diffusion.LatentDDPM``) swaps in an autoencoder's latent grid and reuses the schedule, objectives,
    samplers, labels and guidance unchanged.
    """

    Config = Config
    tiny = {"base_channels": 8, "channel_mults": [1, 2], "timesteps": 20}
    sample_options = frozenset({"sampler", "steps", "eta", "guidance", "labels"})
    capabilities = frozenset({"variational_bound", "ode_solve"})
    bound_strata = 10  # stratified timesteps per image genai evaluate draws for the bound (k + 1 network passes)

    def __init__(self, config: Config, spec: ImageSpec, parents=None):
        super().__init__(config, spec, parents)
        # The Literal types catch these in a YAML file; a Config built in Python is checked here.
        if config.prediction not in PREDICTIONS:
            raise GenaiError(f"unknown model.prediction '{config.prediction}'; valid: {', '.join(PREDICTIONS)}")
        if config.loss_weighting not in LOSS_WEIGHTINGS:
            raise GenaiError(f"unknown model.loss_weighting '{config.loss_weighting}'; "
                             f"valid: {', '.join(LOSS_WEIGHTINGS)}")
        if not config.min_snr_gamma > 0:
            raise GenaiError(f"model.min_snr_gamma must be > 0, got {config.min_snr_gamma}; the paper uses 5")
        self.schedule = NoiseSchedule(config.timesteps, config.schedule)
        # Check the config's sampling defaults now, so a bad YAML fails at load time, not after training.
        self._resolve_options(config.sampler, config.steps, config.eta, config.guidance, explicit=False)

    # -- training -------------------------------------------------------------------------------
    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """Ho Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), || target - net(x_t, t) ||^2 (L_simple, eq. 14, for eps).

        The target is eps, v or x_0 (``model.prediction``); ``model.loss_weighting: min_snr`` weights each image's
        squared error by Min-SNR-gamma (see ``NoiseSchedule.loss_weight``).
        """
        cfg = self.config
        x, y = batch
        x0 = self.to_model_space(x)  # (B, *model_shape): pixels in [-1, 1], or scaled latents
        b = x0.shape[0]
        t = torch.randint(0, cfg.timesteps, (b,), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)  # eq. 4
        labels = self.training_labels(y)  # label dropout: a share learns the unconditional model
        output = self.unet(x_t, t, labels).float()
        target = self.schedule.target(x0.float(), noise.float(), t, cfg.prediction)
        weight = self.schedule.loss_weight(t, target, cfg.prediction, cfg.loss_weighting, cfg.min_snr_gamma)
        return {"loss": (weight * (output - target) ** 2).mean()}  # (B, 1, 1, 1) weights, one per image

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
                                 f"use sampler ddim, dpm++2m or heun for fewer steps")
            steps = T
        elif steps is None:
            steps = min(DEFAULT_STEPS[sampler], T)
        if eta < 0:
            raise GenaiError(f"{where}eta must be >= 0, got {eta}; use 0 for deterministic DDIM")
        if guidance < 0:
            raise GenaiError(f"{where}guidance must be >= 0, got {guidance}; 1 is plain conditional sampling")
        if not cfg.class_conditional and guidance != 1.0:
            raise GenaiError(f"{where}guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        return sampler, steps, eta, guidance

    def sample_settings(self, sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                        guidance: float | None = None) -> tuple[str, int, float, float]:
        """The (sampler, steps, eta, guidance) ``sample`` runs with: the given options over the config's defaults,
        each checked (a one-line GenaiError naming the option)."""
        cfg = self.config
        if guidance is not None and not cfg.class_conditional:
            raise GenaiError("guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        resolved = self._resolve_options(
            cfg.sampler if sampler is None else sampler,
            steps if steps is not None else (cfg.steps if sampler in (None, cfg.sampler) else None),
            cfg.eta if eta is None else eta,
            cfg.guidance if guidance is None else guidance)
        if eta is not None and resolved[0] != "ddim":
            raise GenaiError(f"eta applies to the ddim sampler only, not {resolved[0]}; add sampler ddim or drop eta")
        return resolved

    def check_sample_options(self, options) -> None:
        self.sample_settings(*(options.get(k) for k in ("sampler", "steps", "eta", "guidance")))

    def network_evaluations(self, options) -> int:
        """UNet passes per ``sample``: T for ddpm, ``steps`` for ddim and dpm++2m, 2 steps - 1 for heun (no
        correction into sigma = 0). A guided step is one pass over a batch of 2n."""
        sampler, steps, _, _ = self.sample_settings(*(options.get(k) for k in ("sampler", "steps", "eta", "guidance")))
        return 2 * steps - 1 if sampler == "heun" else steps

    def denoise(self, x: Tensor, t: int | Tensor, labels: Tensor | None = None, guidance: float = 1.0,
                clip: bool = False) -> tuple[Tensor, Tensor]:
        """The model's (eps, x_0) estimate at (x_t, t), whichever target the UNet predicts: every sampler and
        ``variational_bound`` read the network through this one method.

        Classifier-free guidance (Ho & Salimans 2022 eq. 6) mixes the raw outputs, out_uncond + w (out_cond -
        out_uncond): the conversions to eps and x_0 are affine in the output at a fixed (x_t, t), so this is the
        same guided eps for every target. ``clip`` clamps x_0 to the pixel range [-1, 1] (pixel space only: latents
        are unbounded, and LatentDDPM refuses clip_x0) and replaces eps by the
        noise the clamped x_0 implies (eq. 4), so that (eps, x_0) stays a point of the forward process, as in
        guided-diffusion's DDIM: keeping the model's eps instead mixes a clipped x_0 with a noise estimate that
        contradicts it, and with guidance w >= 2 that wrecked 50-step samples.
        """
        tt = t if isinstance(t, Tensor) else torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.network(x, tt, labels, guidance)  # guided: the same mix of raw outputs for every target
        eps, x0 = self.schedule.eps_and_x0(out, x, t, self.config.prediction)
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = self.schedule.predict_eps(x, x0, t)
        return eps, x0

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
               steps: int | None = None, eta: float | None = None, guidance: float | None = None,
               labels=None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]. Options default to the config's; see ``sample_options``.

        sampler: ddpm (all T ancestral steps), ddim (eta = 0 deterministic), dpm++2m or heun (deterministic);
        steps: timesteps visited (``NoiseSchedule.ddim_timesteps``, ``dpm_solver_timesteps``); heun evaluates
        the UNet 2 steps - 1 times.
        labels: a (n,) LongTensor (or one int for all) of classes, conditional models only; by default
        image i gets class i % num_classes. guidance: w in out_uncond + w (out_cond - out_uncond).
        """
        sampler, steps, eta, guidance = self.sample_settings(sampler, steps, eta, guidance)
        labels = self.class_labels(labels, n)
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            x = torch.randn((n, *self.model_shape), generator=generator, device=self.device)  # x_T ~ N(0, I)
            x = self._integrate(x, labels, sampler, steps, eta, guidance, generator)
            return self.from_model_space(x)  # latent diffusion decodes here, still in eval mode
        finally:
            self.train(was_training)

    @torch.no_grad()
    def ode_solve(self, noise: Tensor, *, labels: Tensor | None = None, guidance: float | None = None,
                  sampler: str | None = None, steps: int | None = None) -> Tensor:
        """x_0 (B, *model_shape) in model space (not decoded) from x_T = ``noise``, deterministically: the
        probability-flow ODE by ddim (eta = 0), dpm++2m or heun; options default to the run's (a ddpm default
        becomes dpm++2m). The ancestral ddpm sampler draws noise at every step, so it is refused here.
        labels: (B,) classes of a conditional model (None: class i % K); guidance as in ``sample``."""
        if sampler is None and self.config.sampler == "ddpm":
            sampler = "dpm++2m"
        if sampler == "ddpm":
            raise GenaiError("the ddpm sampler is stochastic (fresh noise at every step); an ODE solve needs "
                             "ddim, dpm++2m or heun")
        sampler, steps, _, guidance = self.sample_settings(sampler, steps, None, guidance)
        labels = self.class_labels(labels, noise.shape[0])
        was_training = self.training
        self.eval()
        try:
            return self._integrate(noise.to(self.device), labels, sampler, steps, 0.0, guidance, None)
        finally:
            self.train(was_training)

    def _integrate(self, x: Tensor, labels: Tensor | None, sampler: str, steps: int, eta: float, guidance: float,
                   generator: torch.Generator | None) -> Tensor:
        """x_T (B, *model_shape) -> x_0 by ``sampler`` (checked options), in model space: ``sample``'s and
        ``ode_solve``'s one loop."""
        cfg, s = self.config, self.schedule

        def denoise(x: Tensor, t: int) -> tuple[Tensor, Tensor]:
            return self.denoise(x, t, labels, guidance, cfg.clip_x0)

        if sampler == "ddpm":
            for t in reversed(range(cfg.timesteps)):
                x = s.ddpm_step(denoise(x, t)[1], t, x, generator)
            return x
        ts = s.dpm_solver_timesteps(steps) if sampler == "dpm++2m" else s.ddim_timesteps(steps)
        last = None  # dpm++2m: (t, x0_hat) of the step before
        for t, t_prev in zip(ts, ts[1:] + [-1], strict=True):
            eps, x0 = denoise(x, t)
            if sampler == "ddim":
                x = s.ddim_step(eps, x0, t, t_prev, x, eta, generator)
            elif sampler == "dpm++2m":
                x, last = s.dpm_solver_step(x0, t, t_prev, x, last), (t, x0)
            else:  # heun: Karras et al. Algorithm 1
                x_euler = s.edm_step(eps, t, t_prev, x)  # line 5
                if t_prev == -1:  # line 6: no correction at sigma = 0
                    x = x_euler
                else:
                    eps_next, _ = denoise(x_euler, t_prev)  # line 7
                    x = s.edm_step((eps + eps_next) / 2, t, t_prev, x)  # line 8
        return x

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

        def x0_hat_at(t: Tensor) -> Tensor:
            x_t = s.add_noise(x0, torch.randn(x0.shape, generator=generator, device=device), t)
            return self.denoise(x_t, t, labels)[1]  # unclipped, whichever target the UNet predicts

        # L_0: the model's mean at the first step is its x_0 estimate (alphā_prev = 1 there).
        mean = x0_hat_at(torch.zeros(b, dtype=torch.long, device=device)).double()
        std = s.betas[0].double().sqrt()
        # The same Gaussian on [0, 1] (mean and std halved with the range: bin masses are unchanged), its 256
        # bin masses formed in log space, so a badly predicted pixel's far-tail bin neither underflows nor clamps.
        decoder = -discretized_log_prob((x0.double() + 1) / 2, (mean + 1) / 2, (std / 2).log(), "gaussian").sum(dims)

        k = max(1, min(timesteps_per_image, T - 1))
        middle = torch.zeros(b, dtype=torch.float64, device=device)
        for j in range(k if T > 1 else 0):
            lo, hi = 1 + (T - 1) * j // k, 1 + (T - 1) * (j + 1) // k  # stratum [lo, hi) of 1..T-1
            t = torch.randint(lo, hi, (b,), generator=generator, device=device)
            # mu_tilde(x_t, x_0) - mu_tilde(x_t, x0_hat) (eq. 7): the x_t terms cancel.
            gap = s._at(s.posterior_mean_x0, t, x0) * (x0 - x0_hat_at(t))
            kl = gap.double().pow(2).sum(dims) / (2 * s.posterior_variance[t].double())
            middle += kl * (hi - lo)
        return -(prior + decoder + middle).float()
