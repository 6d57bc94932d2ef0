"""The deterministic samplers (ddim, dpm++2m, heun) against the exact probability-flow ODE solution for Gaussian
data, against each other across prediction targets, and against diffusers' schedulers (when installed)."""

from __future__ import annotations

import math

import pytest
import torch

from genai_cli.models.base import ImageSpec
from genai_cli.models.diffusion import DDPM, Config

SPEC = ImageSpec(channels=1, size=8, num_classes=0)
MU, S = 0.1, 0.3  # the data: x_0 ~ N(MU, S^2 I), mostly inside [-1, 1]
N = 4


class GaussianOracle(torch.nn.Module):
    """The exact denoiser for x_0 ~ N(mu, s^2 I), standing in for the UNet: E[x_0 | x_t] in closed form, returned as
    the target the model was configured to predict (eps, v or x0), at whole timesteps t."""

    def __init__(self, schedule, prediction: str, mu: float = MU, s: float = S):
        super().__init__()
        self.schedule, self.prediction, self.mu, self.s = schedule, prediction, mu, s
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # the model's device comes from its parameters

    def forward(self, x, t, labels=None):
        abar = self.schedule.alphas_cumprod[t].double().view(-1, 1, 1, 1)
        a, b, xd = abar.sqrt(), (1 - abar).sqrt(), x.double()
        # x_t = a x_0 + b eps: a Gaussian posterior, E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2).
        x0 = self.mu + a * self.s**2 * (xd - a * self.mu) / (a**2 * self.s**2 + b**2)
        eps = (xd - a * x0) / b
        return {"eps": eps, "v": a * eps - b * x0, "x0": x0}[self.prediction].to(x.dtype)


def oracle_model(schedule: str = "linear", prediction: str = "eps", clip_x0: bool = False,
                 timesteps: int = 1000) -> DDPM:
    torch.manual_seed(0)
    m = DDPM(Config(**{**DDPM.tiny, "timesteps": timesteps, "schedule": schedule, "prediction": prediction,
                       "clip_x0": clip_x0}), SPEC)
    m.unet = GaussianOracle(m.schedule, prediction)
    return m


def x_T(seed: int = 0) -> torch.Tensor:
    """The noise sample() starts from with this seed."""
    return torch.randn((N, *SPEC.shape), generator=torch.Generator().manual_seed(seed))


def exact_solution(m: DDPM, seed: int = 0) -> torch.Tensor:
    """Where the probability-flow ODE takes x_T, in [-1, 1] as sample() returns it (times 2, minus 1).

    In y = x_t / sqrt(alphā_t) = x_0 + sigma eps the ODE is dy/dsigma = (y - D(y; sigma)) / sigma with
    D = mu + s^2 / (s^2 + sigma^2) (y - mu), so (y - mu) / sqrt(s^2 + sigma^2) is constant along a path.
    """
    sigma_max = m.schedule.sigma(m.config.timesteps - 1)
    y_T = x_T(seed).double() * math.sqrt(1 + sigma_max**2)
    return (MU + (y_T - MU) * S / math.sqrt(S**2 + sigma_max**2)).clamp(-1, 1)


def draw(m: DDPM, sampler: str, steps: int) -> torch.Tensor:
    return m.sample(N, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps).double() * 2 - 1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_deterministic_samplers_converge_to_the_exact_ode_solution(schedule):
    m = oracle_model(schedule)
    exact = exact_solution(m)
    for sampler, final_tol in [("ddim", 0.03), ("dpm++2m", 5e-3), ("heun", 5e-3)]:
        errors = [float((draw(m, sampler, steps) - exact).abs().max()) for steps in (10, 20, 40, 160)]
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), (sampler, errors)
        assert errors[-1] < final_tol, (sampler, errors)


def test_second_order_samplers_beat_ddim_at_20_steps():
    m = oracle_model("linear")
    exact = exact_solution(m)
    err = {s: float((draw(m, s, 20) - exact).abs().max()) for s in ("ddim", "dpm++2m", "heun")}
    assert err["dpm++2m"] < err["ddim"] and err["heun"] < err["ddim"] / 3, err
    # With the cosine schedule's capped betas, sigma_{T-1} is about 2e4 and Heun's first step (to sigma ~ 12) is
    # poorly conditioned, so only DPM-Solver++ is compared there.
    m = oracle_model("cosine")
    exact = exact_solution(m)
    assert float((draw(m, "dpm++2m", 20) - exact).abs().max()) < float((draw(m, "ddim", 20) - exact).abs().max()) / 2


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m", "heun"])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_every_prediction_target_samples_the_same_images(sampler, clip_x0):
    """The exact eps-, v- and x0-predictors are one denoiser: every sampler must draw the same images from them."""
    steps, timesteps = (200, 200) if sampler == "ddpm" else (10, 1000)
    eps, v, x0 = (oracle_model("linear", p, clip_x0, timesteps) for p in ("eps", "v", "x0"))
    ref = draw(eps, sampler, steps)
    assert torch.allclose(draw(v, sampler, steps), ref, atol=2e-4)
    assert torch.allclose(draw(x0, sampler, steps), ref, atol=2e-4)


# -- diffusers as the reference ------------------------------------------------------------------
# diffusers' set_timesteps hands a torch tensor to np.array, which numpy 2 flags; not ours to fix.
DIFFUSERS_WARNING = "ignore:__array__ implementation:DeprecationWarning"


def diffusers_scheduler(cls, m: DDPM, **kwargs):
    s = m.schedule
    sched = cls(num_train_timesteps=s.timesteps, trained_betas=s.betas.numpy(), prediction_type="epsilon", **kwargs)
    # diffusers takes the float32 cumulative product of float32 betas; ours is taken in float64. At the cosine
    # schedule's last step (alphā ~ 2e-9) that alone moves the result by ~1e-4, so both use the same alphā here.
    sched.alphas_cumprod = s.alphas_cumprod.clone()
    return sched


@pytest.mark.filterwarnings(DIFFUSERS_WARNING)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 20])  # below 15 diffusers' lower_order_final kicks in; 2M is unaffected
def test_dpm_solver_matches_diffusers(schedule, steps):
    from_diffusers = pytest.importorskip("diffusers")
    m = oracle_model(schedule)
    # The defaults are the settings we follow: timestep_spacing="linspace", final_sigmas_type="zero" (the last step
    # is first order, to sigma = 0), lower_order_final=True, solver_type="midpoint" (Lu et al. Algorithm 2).
    sched = diffusers_scheduler(from_diffusers.DPMSolverMultistepScheduler, m, algorithm_type="dpmsolver++",
                                solver_order=2)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == m.schedule.dpm_solver_timesteps(steps)
    x = x_T()
    for t in sched.timesteps:
        x = sched.step(m.unet(x, torch.full((N,), int(t))), t, x).prev_sample
    assert torch.allclose(draw(m, "dpm++2m", steps), x.double().clamp(-1, 1), atol=1e-4)


@pytest.mark.filterwarnings(DIFFUSERS_WARNING)
@pytest.mark.parametrize("steps", [5, 20])
def test_heun_matches_diffusers(steps):
    """HeunDiscreteScheduler, given our whole-number timesteps (its own "linspace" grid is fractional)."""
    from_diffusers = pytest.importorskip("diffusers")
    m = oracle_model("linear")
    ts = m.schedule.ddim_timesteps(steps)
    sched = diffusers_scheduler(from_diffusers.HeunDiscreteScheduler, m)
    sched.set_timesteps(timesteps=ts)
    x = x_T() * math.sqrt(1 + m.schedule.sigma(ts[0]) ** 2)  # diffusers' Heun works in y = x_t / sqrt(alphā_t)
    for t in sched.timesteps:
        out = m.unet(sched.scale_model_input(x, t), torch.full((N,), round(float(t))))
        x = sched.step(out, t, x).prev_sample
    assert torch.allclose(draw(m, "heun", steps), x.double().clamp(-1, 1), atol=1e-4)
