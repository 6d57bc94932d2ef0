"""Flow matching (Lipman et al. 2023) on the straight path of rectified flow (Liu et al. 2023), with Euler, midpoint,
Heun and adaptive Dormand-Prince samplers, and latent_flow on a frozen autoencoder's latent grid.

A point of the data x_0 and a draw of noise eps are joined by the straight line

    x_t = (1 - t) x_0 + t eps,   t in [0, 1]     (t = 0: the data, t = 1: the prior N(0, I))

whose velocity dx_t/dt = eps - x_0 the network learns to predict (conditional flow matching, Lipman et al. eq. 23
with sigma_min = 0; the objective behind SD3, Esser et al. 2024). The regression's minimiser is the marginal
velocity v(x, t) = E[eps - x_0 | x_t = x], and integrating dx/dt = v from t = 1 down to t = 0 carries N(0, I) onto
the data: sampling is an ODE solve (torchdiffeq), deterministic given the noise.

- ``model.t_sampling``: t ~ U(0, 1), or logit-normal, sigmoid(N(logit_mean, logit_std^2)) (Esser et al. sec. 3.1),
  which trains the middle of the path, where the velocity is hardest to predict, more often.
- ``model.coupling: ot``: minibatch optimal transport (Tong et al. 2023, OT-CFM): the batch's noise is permuted
  so that the total squared distance between paired data and noise is least (an exact assignment, scipy's
  ``linear_sum_assignment``), which straightens the paths the network has to learn.
- Likelihood: the ODE is a continuous normalising flow, so log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div v dt
  (the instantaneous change of variables, Chen et al. 2018, eq. 4), with the divergence estimated by Hutchinson's
  trace estimator z^T (dv/dx) z (Grathwohl et al. 2018, FFJORD). ``likelihood_estimate``.

The network, its size presets, the class conditioning with label dropout and classifier-free guidance, and the
pluggable space (pixels in [-1, 1], or latents) are DDPM's: ``diffusion.DenoisingFamily``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..errors import GenaiError
from ..registry import register_model
from .base import ImageSpec, RunRef, run_ref
from .diffusion import DenoisingFamily, NetworkConfig
from .latent_diffusion import LATENT_DIT_PRESETS, LATENT_PRESETS, LatentSpace

SAMPLERS = ("euler", "midpoint", "heun", "dopri5")
FIXED_METHODS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2"}  # torchdiffeq's names
CALLS_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}
DEFAULT_STEPS = {"euler": 20, "midpoint": 10, "heun": 10}  # 20 network evaluations each
T_SAMPLINGS = ("uniform", "logit_normal")
COUPLINGS = ("independent", "ot")
# t in [0, 1] enters the network as 1000 t: the sinusoidal time features were sized for DDPM's timesteps 0..999.
TIME_SCALE = 1000.0
MAX_ADAPTIVE_STEPS = 10_000  # dopri5 gives up (a GenaiError) past this many steps: a tolerance too tight to meet


# -- the path, the coupling, the divergence: pure functions, tested against their definitions -----------------
def straight_path(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, dx_t/dt) on the straight path x_t = (1 - t) x_0 + t eps, for t (B,): the point and the velocity target
    eps - x_0 (Liu et al. 2023 eq. 1; Lipman et al. 2023 eq. 20-23 with sigma_min = 0)."""
    tt = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, noise - x0


def sample_t(n: int, how: str, mean: float = 0.0, std: float = 1.0, *, device=None,
             generator: torch.Generator | None = None) -> Tensor:
    """n times in (0, 1): uniform, or logit-normal sigmoid(mean + std N(0, 1)) (Esser et al. 2024 eq. 19)."""
    if how == "uniform":
        return torch.rand(n, device=device, generator=generator)
    if how == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    raise GenaiError(f"unknown model.t_sampling '{how}'; valid: {', '.join(T_SAMPLINGS)}")


def pairing_cost(x0: Tensor, noise: Tensor) -> Tensor:
    """(B, B) squared Euclidean distances between every data point x0[i] and every noise draw noise[j]."""
    return torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()) ** 2


def ot_coupling(x0: Tensor, noise: Tensor) -> Tensor:
    """The batch's noise reordered so that noise[i] is paired with x0[i] by the exact minibatch optimal transport
    plan for the squared distance (Tong et al. 2023, OT-CFM: uniform weights make the plan a permutation, found by
    the Hungarian algorithm in scipy's ``linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(pairing_cost(x0, noise).cpu().double().numpy())
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return noise[order.to(noise.device)]


def hutchinson_divergence(v: Tensor, x: Tensor, z: Tensor) -> Tensor:
    """(B,) an unbiased estimate z^T (dv/dx) z of div v = tr(dv/dx) per batch row (Hutchinson 1989; E[z z^T] = I),
    one vector-Jacobian product; v must have been computed from x with gradients on."""
    (vjp,) = torch.autograd.grad(v, x, z, create_graph=False)
    return (vjp * z).flatten(1).sum(1)


def solve(f, x: Tensor, t_from: float, t_to: float, sampler: str, steps: int | None = None, atol: float = 1e-5,
          rtol: float = 1e-5) -> Tensor:
    """x(t_to) for dx/dt = f(t, x) from x(t_from) = x, by torchdiffeq: euler, midpoint or heun on ``steps`` equal
    steps, or dopri5 (Dormand & Prince 1980), adaptive within atol + rtol |x| per step. f takes a 0-dim time."""
    from torchdiffeq import odeint

    device = x[0].device if isinstance(x, tuple) else x.device  # a state may be a tuple of tensors
    if sampler == "dopri5":
        try:
            out = odeint(f, x, torch.tensor([t_from, t_to], device=device), method="dopri5", atol=atol, rtol=rtol,
                         options={"max_num_steps": MAX_ADAPTIVE_STEPS})
        except AssertionError as e:  # torchdiffeq's "max_num_steps exceeded"
            raise GenaiError(f"dopri5 could not meet atol={atol}, rtol={rtol} within {MAX_ADAPTIVE_STEPS} steps ({e}); "
                             f"loosen the tolerances, e.g. --atol 1e-4 --rtol 1e-4") from None
    else:
        if sampler not in FIXED_METHODS:
            raise GenaiError(f"unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
        grid = torch.linspace(t_from, t_to, steps + 1, device=device)
        out = odeint(f, x, grid, method=FIXED_METHODS[sampler])
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]  # the state at t_to


def ode_log_likelihood(f, x0: Tensor, z: Tensor, tol: float = 1e-5) -> Tensor:
    """(B,) log p_0(x0) of the flow dx/dt = f(t, x) that carries p_0 at t = 0 onto N(0, I) at t = 1: the
    instantaneous change of variables (Chen et al. 2018, eq. 4), log p_0(x_0) = log N(x_1; 0, I) + int_0^1 div f dt,
    with the divergence estimated as z^T (df/dx) z for the fixed probes z (x0's shape: Rademacher or Gaussian,
    FFJORD), one dopri5 solve of (x_t, the integral) within atol = rtol = ``tol``. Unbiased over z."""
    b = x0.shape[0]

    def g(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            xt = state[0].detach().requires_grad_(True)
            v = f(t, xt)
            div = hutchinson_divergence(v, xt, z)
        return v.detach(), div.detach()

    x1, integral = solve(g, (x0, torch.zeros(b, dtype=x0.dtype, device=x0.device)), 0.0, 1.0, "dopri5",
                         atol=tol, rtol=tol)
    dims = x0[0].numel()
    prior = -0.5 * (x1.flatten(1) ** 2).sum(1) - 0.5 * dims * math.log(2 * math.pi)  # log N(x_1; 0, I)
    return prior + integral


# -- the family -------------------------------------------------------------------------------------------------
@dataclass
class Config(NetworkConfig):
    t_sampling: Literal["uniform", "logit_normal"] = "uniform"  # how training draws t (logit_normal: Esser et al.)
    logit_mean: float = 0.0  # logit_normal: the mean of logit(t) (SD3: 0)
    logit_std: float = 1.0  # logit_normal: the standard deviation of logit(t) (SD3: 1)
    coupling: Literal["independent", "ot"] = "independent"  # ot: minibatch optimal transport pairs (OT-CFM)
    sampler: Literal["euler", "midpoint", "heun", "dopri5"] = "heun"
    steps: int | None = None  # fixed-step samplers; None: 20 network evaluations (euler 20, midpoint and heun 10)
    atol: float = 1e-5  # dopri5's absolute tolerance
    rtol: float = 1e-5  # dopri5's relative tolerance
    guidance: float = 1.0  # classifier-free guidance weight w (class_conditional only); 1 = plain conditional


@register_model("flow", "Flow matching on a UNet: straight paths, Euler/midpoint/Heun/dopri5 ODE samplers")
class Flow(DenoisingFamily):
    """Conditional flow matching with a velocity-predicting network; sampling integrates its ODE from the prior.

    ``ode_solve`` is the deterministic map noise -> x_0 in model space (what a distilled student learns);
    ``sample`` decodes it. ``network_calls`` counts the network's calls, so an adaptive solve reports its cost.
    """

    Config = Config
    tiny = {"base_channels": 8, "channel_mults": [1, 2]}
    sample_options = frozenset({"sampler", "steps", "atol", "rtol", "guidance", "labels"})
    capabilities = frozenset({"ode_solve", "likelihood_estimate"})
    likelihood_tolerance = 1e-5  # atol = rtol of the likelihood's dopri5 solve (Lipman et al. report 1e-5)

    def __init__(self, config: Config, spec: ImageSpec, parents=None):
        super().__init__(config, spec, parents)
        # The Literal types catch these in a YAML file; a Config built in Python is checked here.
        if config.t_sampling not in T_SAMPLINGS:
            raise GenaiError(f"unknown model.t_sampling '{config.t_sampling}'; valid: {', '.join(T_SAMPLINGS)}")
        if not config.logit_std > 0:
            raise GenaiError(f"model.logit_std must be > 0, got {config.logit_std}; SD3 uses 1")
        if config.coupling not in COUPLINGS:
            raise GenaiError(f"unknown model.coupling '{config.coupling}'; valid: {', '.join(COUPLINGS)}")
        self._solve_record: tuple[Any, int] | None = None  # (settings, network calls) of the last ode_solve
        self._settings(config.sampler, config.steps, config.atol, config.rtol, config.guidance, where="model.")

    # -- training -----------------------------------------------------------------------------------------------
    def loss(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """|| v_theta(x_t, t) - (eps - x_0) ||^2 on the straight path (conditional flow matching)."""
        cfg = self.config
        x, y = batch
        x0 = self.to_model_space(x)  # (B, *model_shape)
        noise = torch.randn_like(x0)
        if cfg.coupling == "ot":
            noise = ot_coupling(x0, noise)
        t = sample_t(x0.shape[0], cfg.t_sampling, cfg.logit_mean, cfg.logit_std, device=x0.device)
        x_t, target = straight_path(x0, noise, t)
        output = self.unet(x_t, t * TIME_SCALE, self.training_labels(y)).float()
        return {"loss": ((output - target.float()) ** 2).mean()}

    # -- the velocity field and its ODE ---------------------------------------------------------------------------
    def velocity(self, x: Tensor, t: float | Tensor, labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """v_theta(x, t) (float32, x's shape) for a time t in [0, 1] (a float, a 0-dim or a (B,) tensor); guided
        as the network's raw output: v_uncond + w (v_cond - v_uncond)."""
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        return self.network(x, tt * TIME_SCALE, labels, guidance)

    def _settings(self, sampler, steps, atol, rtol, guidance, where: str = "") -> tuple[str, int | None, float, float,
                                                                                          float]:
        if sampler not in SAMPLERS:
            raise GenaiError(f"unknown {where}sampler '{sampler}'; valid: {', '.join(SAMPLERS)}")
        if sampler == "dopri5":
            if steps is not None:
                raise GenaiError(f"the dopri5 sampler chooses its own steps (adaptive), got {where}steps={steps}; "
                                 f"drop the steps option and set the tolerances (atol, rtol) instead")
        else:
            steps = DEFAULT_STEPS[sampler] if steps is None else steps
            if steps < 1:
                raise GenaiError(f"{where}steps must be >= 1, got {steps}")
        for name, tol in (("atol", atol), ("rtol", rtol)):
            if not tol > 0:
                raise GenaiError(f"{where}{name} must be > 0, got {tol}; e.g. 1e-5")
        if guidance < 0:
            raise GenaiError(f"{where}guidance must be >= 0, got {guidance}; 1 is plain conditional sampling")
        if not self.config.class_conditional and guidance != 1.0:
            raise GenaiError(f"{where}guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        return sampler, steps, float(atol), float(rtol), float(guidance)

    def sample_settings(self, sampler: str | None = None, steps: int | None = None, atol: float | None = None,
                        rtol: float | None = None, guidance: float | None = None):
        """The (sampler, steps, atol, rtol, guidance) a solve runs with: the given options over the config's
        defaults, each checked (a one-line GenaiError naming the option). steps is None for dopri5."""
        cfg = self.config
        chosen = cfg.sampler if sampler is None else sampler
        if chosen != "dopri5" and (atol is not None or rtol is not None):
            raise GenaiError(f"atol and rtol are the adaptive dopri5 sampler's tolerances, not {chosen}'s; "
                             f"add sampler dopri5 or drop them")
        if steps is None and chosen == cfg.sampler:
            steps = cfg.steps
        return self._settings(chosen, steps, cfg.atol if atol is None else atol, cfg.rtol if rtol is None else rtol,
                              cfg.guidance if guidance is None else guidance)

    def check_sample_options(self, options) -> None:
        if options.get("guidance") is not None and not self.config.class_conditional:
            raise GenaiError("guidance needs a class-conditional model; "
                             "train with model.class_conditional=true or drop the guidance option")
        self.sample_settings(*(options.get(k) for k in ("sampler", "steps", "atol", "rtol", "guidance")))

    @contextmanager
    def _evaluating(self):
        was_training = self.training
        self.eval()  # no dropout while solving
        try:
            yield
        finally:
            self.train(was_training)

    def ode_solve(self, noise: Tensor, *, labels: Tensor | None = None, guidance: float | None = None,
                  sampler: str | None = None, steps: int | None = None, atol: float | None = None,
                  rtol: float | None = None) -> Tensor:
        """x_0 (B, *model_shape), in model space, from noise x_1 (B, *model_shape): dx/dt = v_theta(x, t) integrated
        from t = 1 to t = 0 by torchdiffeq (euler, midpoint, heun on ``steps`` equal steps; dopri5 adaptive within
        atol + rtol |x|). Deterministic. ``labels`` as ``class_labels`` reads them (None on a conditional model:
        class i % K, as DDPM's); options not given are the config's."""
        sampler, steps, atol, rtol, guidance = self.sample_settings(sampler, steps, atol, rtol, guidance)
        labels = self.class_labels(labels, noise.shape[0])

        def f(t: Tensor, x: Tensor) -> Tensor:
            return self.velocity(x, t, labels, guidance)

        before = self.network_calls
        with torch.no_grad(), self._evaluating():
            out = solve(f, noise.float(), 1.0, 0.0, sampler, steps, atol, rtol)
        self._solve_record = ((sampler, steps, atol, rtol, guidance), self.network_calls - before)
        return out

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, sampler: str | None = None,
               steps: int | None = None, atol: float | None = None, rtol: float | None = None,
               guidance: float | None = None, labels=None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]: the ODE solved from x_1 ~ N(0, I) and decoded. labels: as DDPM's (by
        default image i gets class i % num_classes)."""
        labels = self.class_labels(labels, n)
        noise = torch.randn((n, *self.model_shape), generator=generator, device=self.device)
        x0 = self.ode_solve(noise, labels=labels, guidance=guidance, sampler=sampler, steps=steps, atol=atol,
                            rtol=rtol)
        with self._evaluating():
            return self.from_model_space(x0)  # latent_flow decodes here

    def network_evaluations(self, options) -> int:
        """Network passes per ``sample``: steps x 1 (euler) or x 2 (midpoint, heun); dopri5's are measured, those
        of the last solve with the same settings (or of one solve of one image, when there was none)."""
        settings = self.sample_settings(*(options.get(k) for k in ("sampler", "steps", "atol", "rtol", "guidance")))
        sampler, steps = settings[:2]
        if sampler != "dopri5":
            return steps * CALLS_PER_STEP[sampler]
        if self._solve_record is None or self._solve_record[0] != settings:
            g = torch.Generator(self.device).manual_seed(0)
            labels = self.class_labels(None, 1)
            self.ode_solve(torch.randn((1, *self.model_shape), generator=g, device=self.device), labels=labels,
                           **{k: options.get(k) for k in ("sampler", "atol", "rtol", "guidance")})
        return self._solve_record[1]

    # -- likelihood: the instantaneous change of variables, with a Hutchinson trace ---------------------------------
    def likelihood_estimate(self, batch, *, generator: torch.Generator | None = None) -> Tensor:
        """(B,) an unbiased estimate of a lower bound on log P(x) in nats, of 8-bit images x (B, C, H, W).

        Uniform dequantisation (Theis et al. 2016): y = 2 (k + u) / 256 - 1 for pixel levels k and u ~ U[0, 1)^D
        gives log P(k) >= E_u[log p(y)] + D log(2 / 256). log p(y) = log N(y_1; 0, I) + int_0^1 div v(y_t, t) dt
        comes from one dopri5 solve from t = 0 to 1 of (y_t, the integral), with the divergence estimated by
        z^T (dv/dy) z for one Rademacher z per image (FFJORD). Unbiased in u and z up to the solver's tolerance
        (``likelihood_tolerance``); genai evaluate reports the mean with its standard error. Conditional models
        are scored with each image's own label: log p(x | y). Runs in float32, with gradients (the vector-Jacobian
        product), so call it outside autocast and no_grad.
        """
        x, y = batch
        x = x.float()
        levels = (x * 255).round()
        u = torch.rand(x.shape, generator=generator, device=x.device)
        y0 = 2 * (levels + u) / 256 - 1  # (B, C, H, W) in [-1, 1)
        z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).float() * 2 - 1
        labels = y if self.conditional else None
        with self._evaluating(), torch.autocast(x.device.type, enabled=False):
            log_p = ode_log_likelihood(lambda t, xt: self.velocity(xt, t, labels), y0, z, self.likelihood_tolerance)
        return log_p + x[0].numel() * math.log(2 / 256)  # the Jacobian of y = 2 (k + u) / 256 - 1


@dataclass
class LatentConfig(Config):
    autoencoder: RunRef = run_ref(accepts=("spatial_ae", "vqvae"))  # the trained first stage: a run or path

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = LATENT_PRESETS
    DIT_PRESETS: ClassVar[dict[str, dict[str, Any]]] = LATENT_DIT_PRESETS


@register_model("latent_flow", "Flow matching in a frozen autoencoder's latent grid; model.autoencoder: RUN")
class LatentFlow(LatentSpace, Flow):
    """The flow family on the scaled latents of a frozen autoencoder (``latent_diffusion.LatentSpace``, latent_ddpm's
    mechanism); samples decode through it. No likelihood: that of latents says nothing of the pixels' (withdrawn)."""

    Config = LatentConfig
    tiny = {"base_channels": 8, "channel_mults": [1]}
    capabilities = LatentSpace.capabilities | {"ode_solve"}
    likelihood_estimate = None
